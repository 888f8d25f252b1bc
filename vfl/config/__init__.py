"""Party configuration: TOML -> frozen dataclasses, validated once, passed explicitly.

The package's public surface is this module: import the names below from ``vfl.config``.
Its modules are its parts: :mod:`~vfl.config.party` (:class:`PartyConfig`,
:func:`load_config`, ``[party]``, ``[data]``, ``[executor]``, ``[arbiter]``, ``[testing]``),
:mod:`~vfl.config.network` (``[tls]``, ``[[peers]]``, ``[transport]``),
:mod:`~vfl.config.policy` (``[accept]``, ``[psi]``), :mod:`~vfl.config.scoring`
(``[scoring]``) and :mod:`~vfl.config.values` (the checked readers they share).

Example (relative paths are resolved against the config file's folder)::

    [party]
    id = "bank"                  # = the SAN of this party's certificate
    role = "guest"
    listen = "127.0.0.1:50051"   # port 0 picks a free port, written to <state_dir>/service.port
    state_dir = "state/bank"
    health = 8081                # optional plain-HTTP /healthz and /readyz for probes: a port
                                 # (loopback only) or "host:port"; off when absent

    [tls]
    ca = "certs/ca.pem"
    certificate = "certs/bank.pem"
    key = "certs/bank.key"

    [[peers]]
    id = "retailer"
    role = "host"
    address = "127.0.0.1:50052"
    certificate = "certs/retailer.pem"   # pinned: only this certificate is accepted

    [data]                       # aliases jobs use to name this party's files
    credit = "/data/credit_guest.csv"

    [transport]                  # optional; see protocols.transport.TransportOptions
    retry_seconds = 30

    [executor]                   # optional: where heavy parallel work runs, inside this silo
    backend = "local"            # "local" process pool (default) or "ray": the silo's cluster
    workers = 8                  # processes / Ray actors; default: this machine's / the
                                 # cluster's CPU count
    ray_address = "10.1.0.5:6379"  # ray: the cluster head (ray start --head --port 6379);
                                 # default "auto": the cluster this machine joined
    allow_plaintext_cluster = false  # ray: accept a cluster without Ray TLS (warns)

    [arbiter]                    # arbiter only, optional
    key_bits = 2048              # Paillier key made at first start, kept in state_dir
    allow_test_key = false       # true admits < 2048-bit keys: tests only, never for data
    max_resumes = 100            # RESUMEs one job may have (each re-opens at most 2 steps)

    [accept]                     # optional: what this party takes part in (host, arbiter)
    guests = ["bank"]            # who may submit jobs; default: every [[peers]] guest
    job_types = ["split_nn", "psi", "scoring", "horizontal", "transfer"]   # default: all
    data = ["credit"]            # aliases a guest may name; default: every [data] alias
    max_d = 64                   # host embedding width d (default 64)
    max_k = 64                   # interactive width k (default 64)
    max_host_params = 1000000    # parameters of the model a guest asks this party to train
                                 # (the host bottom model; a horizontal job's whole model)
    min_key_bits = 2048          # arbiter key size; default 2048, or no minimum when
                                 # [arbiter] allow_test_key = true (so test keys pass)
    protect_modes = ["gaussian", "max_norm", "marvell"]  # default: every mode but "none"
    allow_plaintext = false      # plaintext experiments (nothing encrypted)

    [psi]                        # optional (host): what a guest's PSI may use of our data
    modes = ["both", "guest_only", "cardinality"]   # PSI modes served; default: all
    min_pad_to = 100000          # a request must pad both lists to at least this many
                                 # elements (default 0: no minimum)
    id_column = "id"             # the id column of every alias (default "id") ...
    duplicates = "error"         # ... and its duplicates policy (default "error")
    [psi.data.credit]            # per data alias, overriding the defaults above
    id_column = "email"
    id_type = "email"            # the canonicalisation a guest must ask for (default: any)
    duplicates = "latest"        # "error", "first" or "latest" (needs timestamp_column)
    timestamp_column = "updated"

    [scoring]                    # arbiter only, optional: who may score with which model
    requesters = ["bank"]        # default: every [[peers]] guest
    quota_rows = 100000          # rows each model may score per quota window
    quota_days = 30              # the quota window (usage starts again from 0 after it)
    valid_days = 365             # a grant ends this long after it is made ...
    [scoring.models."credit-2026-12"]
    quota_rows = 50000           # ... unless a model overrides it
    expires = "2027-06-30"       # the grant ends at 00:00 UTC of this day
    requesters = ["bank"]

    [random]                     # optional: reproducible runs (docs/protocol.md §4.4.2)
    seed = 7                     # this party's own draws (its W_0 component, its model's
                                 # initialisation, its noise; the guest's default job seed),
                                 # keyed by its local secret <state_dir>/seed.key, so a peer
                                 # that knows the seed still cannot predict them

    [testing]                    # optional, tests only
    allow_hold = true            # the guest's `train` may ask to pause after a step
                                 # ("hold_at_step") until admin `release` (tests of restarts)
"""

from vfl.config.network import PeerConfig, TlsPaths
from vfl.config.party import PartyConfig, load_config, parse_config
from vfl.config.policy import AcceptPolicy, JobType, PsiDataPolicy, PsiPolicy
from vfl.config.scoring import ScoringGrant, ScoringModelPolicy, ScoringPolicyConfig

__all__ = [
    "AcceptPolicy",
    "JobType",
    "PartyConfig",
    "PeerConfig",
    "PsiDataPolicy",
    "PsiPolicy",
    "ScoringGrant",
    "ScoringModelPolicy",
    "ScoringPolicyConfig",
    "TlsPaths",
    "load_config",
    "parse_config",
]
