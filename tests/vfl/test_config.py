"""Party config: a valid file loads; every bad one names the key and the problem."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from protocols.errors import ConfigError, InsecureConfigError
from protocols.executor import Backend, ExecutorSettings
from protocols.roles import Role
from vfl.config import AcceptPolicy, JobType, ScoringGrant, load_config
from vfl.fedavg.jobfile import load_fed_job_file
from vfl.privacy.label_protection import ProtectMode
from vfl.splitnn.jobfile import load_job_file

GOOD = """
[party]
id = "bank"
role = "guest"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "certs/ca.pem"
certificate = "certs/bank.pem"
key = "certs/bank.key"

[[peers]]
id = "retailer"
role = "host"
address = "10.0.0.2:50051"
certificate = "certs/retailer.pem"

[data]
credit = "data/credit.csv"

[transport]
retry_seconds = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "party.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.party.party_id == "bank" and cfg.party.role is Role.GUEST
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.tls.key == tmp_path / "certs" / "bank.key"
    assert cfg.peer("retailer").certificate == tmp_path / "certs" / "retailer.pem"
    assert cfg.data["credit"] == tmp_path / "data" / "credit.csv"
    assert cfg.transport.retry_seconds == 5


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ('id = "bank"', 'idd = "bank"', "[party]: unknown key 'idd'"),
        ('role = "guest"', 'role = "banker"', "party.role: 'banker' is not a role"),
        ('id = "bank"', 'id = "Bank_1"', "party.id: 'Bank_1' is not a valid party id"),
        (
            'listen = "127.0.0.1:0"',
            'listen = "localhost"',
            "party.listen: 'localhost' is not host:port",
        ),
        (
            'address = "10.0.0.2:50051"',
            "address = 5",
            "peers[0].address: must be a non-empty string",
        ),
        ('id = "retailer"', 'id = "bank"', "peers[0].id: 'bank' is this party itself"),
        ("retry_seconds = 5", "retry_seconds = -1", "transport retry_seconds must be positive"),
        ("retry_seconds = 5", "retries = 5", "[transport]: unknown key 'retries'"),
        ("retry_seconds = 5", 'retry_seconds = "5"', "transport.retry_seconds must be a number"),
        ('ca = "certs/ca.pem"', "", "tls.ca: missing"),
        ("[tls]", "[tlss]", "unknown key 'tlss'"),
        ('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0', "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, old: str, new: str, needle: str) -> None:
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_unknown_peer_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(peers: retailer\)"):
        load_config(write(tmp_path, GOOD)).peer("arbiter")


def test_example_configs_load() -> None:
    folder = Path(__file__).resolve().parents[2] / "examples" / "three_parties"
    tomls = sorted(folder.glob("*.toml"))
    configs = [load_config(p) for p in tomls if not p.name.endswith("_job.toml")]
    assert {c.party.party_id for c in configs} == {"arbiter", "bank", "retailer"}
    for c in configs:
        assert all(path.is_file() for path in c.data.values()), c.data
    jobs = [load_job_file(p) for p in tomls if p.name.endswith("_job.toml")]
    aliases = {c.party.party_id: set(c.data) for c in configs}
    assert jobs and all(
        j.guest_data in aliases["bank"] and j.host_data in aliases["retailer"] for j in jobs
    )


def test_horizontal_example_configs_and_job_load() -> None:
    folder = Path(__file__).resolve().parents[2] / "examples" / "horizontal"
    configs = {
        c.party.party_id: c
        for c in (load_config(p) for p in folder.glob("*.toml") if p.stem != "credit_fedavg")
    }
    assert set(configs) == {"arbiter", "bank", "retailer", "shop"}
    job = load_fed_job_file(folder / "credit_fedavg.toml", coordinator="bank").job
    for party_id, alias in job.clients:
        assert configs[party_id].data[alias].is_file()
        others = [c for c in job.client_ids if c != party_id]
        assert all(configs[party_id].peer(o).certificate is not None for o in others)


def test_job_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nguest_data = "credit"\nhost_data = "credit"\nbatchsize = 3\n')
    with pytest.raises(
        ConfigError, match=r"job.toml: \[job\] has unknown key\(s\) \['batchsize'\]"
    ):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "credit"\nhost_data = "credit"\n[model]\neta_w = 2.0\n')
    with pytest.raises(ConfigError, match="job.toml: eta_w = 2.0"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "c"\nplaintext = true\n')
    with pytest.raises(InsecureConfigError, match="--plaintext"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "c"\n[protect]\nmode = "none"\n')
    with pytest.raises(InsecureConfigError, match="allow_label_leak"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "h"\nepochs = 3\n[model]\nd = 4\n')
    parsed = load_job_file(job)
    assert parsed.job.epochs == 3 and parsed.job.train.d == 4 and parsed.host_data == "h"
    assert parsed.job.train.protect.mode.value == "marvell"  # a protecting default


HOST = """
[party]
id = "retailer"
role = "host"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "ca.pem"
certificate = "retailer.pem"
key = "retailer.key"

[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"

[[peers]]
id = "arbiter"
role = "arbiter"
address = "127.0.0.1:2"

[data]
credit = "credit.csv"
breast = "breast.csv"
"""


def test_accept_defaults_are_the_safe_choice(tmp_path: Path) -> None:
    """Without [accept]: the configured guests, every alias, all job types, d, k <= 64,
    2048-bit keys (no minimum with allow_test_key), every protection but none, no plaintext."""
    cfg = load_config(write(tmp_path, HOST))
    accept = cfg.accept
    assert accept.guests == {"bank"} and accept.data == {"credit", "breast"}
    assert accept.job_types == set(JobType)
    assert (accept.max_d, accept.max_k, accept.max_host_params) == (64, 64, 1_000_000)
    assert accept.min_key_bits == 2048 and not accept.allow_plaintext
    assert accept.protect_modes == set(ProtectMode) - {ProtectMode.NONE}
    test_key = load_config(write(tmp_path, HOST + "\n[arbiter]\nallow_test_key = true\n"))
    assert test_key.accept.min_key_bits == 0  # test keys pass; set it to test the check
    assert cfg.seed is None


def test_accept_section_is_parsed(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            HOST
            + """
[accept]
guests = ["bank"]
job_types = ["split_nn"]
data = ["credit"]
max_d = 8
max_k = 16
max_host_params = 5000
min_key_bits = 3072
protect_modes = ["marvell", "none"]
allow_plaintext = true

[random]
seed = 7
""",
        )
    )
    assert cfg.accept == AcceptPolicy(
        guests=frozenset({"bank"}),
        job_types=frozenset({JobType.SPLIT_NN}),
        data=frozenset({"credit"}),
        max_d=8,
        max_k=16,
        max_host_params=5000,
        min_key_bits=3072,
        protect_modes=frozenset({ProtectMode.MARVELL, ProtectMode.NONE}),
        allow_plaintext=True,
    )
    assert cfg.seed == 7


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ('[accept]\nguests = ["retailer2"]', "accept.guests: 'retailer2' is not a [[peers]] entry"),
        (
            '[accept]\nguests = ["arbiter"]',
            "accept.guests: 'arbiter' is not a [[peers]] entry with",
        ),
        ('[accept]\nguests = "bank"', "accept.guests must be a list of strings"),
        ('[accept]\ndata = ["credt"]', "accept.data: 'credt' is not an alias in [data]"),
        ('[accept]\njob_types = ["fedavg"]', "accept.job_types: 'fedavg' is not one of"),
        ('[accept]\nprotect_modes = ["dp"]', "accept.protect_modes: 'dp' is not one of"),
        ("[accept]\nmax_d = 0", "accept.max_d must be a positive integer, got 0"),
        ('[accept]\nmax_k = "8"', "accept.max_k must be a positive integer"),
        ("[accept]\nmax_host_params = true", "accept.max_host_params must be a positive"),
        ("[accept]\nmin_key_bits = 1024", "accept.min_key_bits = 1024 is below the 2048-bit"),
        ('[accept]\nallow_plaintext = "yes"', "accept.allow_plaintext must be true or false"),
        ("[accept]\nmax_dd = 3", "[accept]: unknown key 'max_dd'"),
        ("[scoring]\nquota_rows = -5", "scoring.quota_rows must be a positive integer"),
        ("[scoring]\nvalid_days = 0", "scoring.valid_days must be a positive number of days"),
        ('[scoring]\nrequesters = ["mallory"]', "scoring.requesters: 'mallory' is not a [[peers]]"),
        ('[scoring.models."m"]\nexpires = "June"', "scoring.models.\"m\".expires: 'June' is not a"),
        ('[scoring.models."m"]\nquota = 5', "unknown key 'quota'"),
        ("[random]\nseed = -1", "random.seed must be a non-negative integer"),
        ('[executor]\nbackend = "dask"', "executor.backend 'dask' is not one of local, ray"),
        ("[executor]\nworkers = 0", "executor.workers must be at least 1, got 0"),
        ('[executor]\nworkers = "8"', "executor.workers must be a whole number"),
        ('[executor]\nray_address = "h:1"', 'executor.ray_address needs backend = "ray"'),
        ('[executor]\nbackend = "ray"\nray_address = ""', "executor.ray_address must be"),
        ("[executor]\nallow_plaintext_cluster = 1", "allow_plaintext_cluster must be true or"),
        ("[executor]\nadress = 1", "[executor]: unknown key 'adress'"),
        ("[arbiter]\nmax_resumes = 0", "arbiter.max_resumes must be a positive integer"),
        ("[scoring]\nquota_days = 0", "scoring.quota_days must be a positive number of days"),
    ],
)
def test_bad_policies_name_the_key(tmp_path: Path, section: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, HOST + "\n" + section + "\n"))
    assert needle in str(info.value) and "party.toml" in str(info.value), str(info.value)


def test_scoring_grants(tmp_path: Path) -> None:
    """Defaults for every model (a modest 100,000 rows per 30 days); per-model overrides;
    expiry at 00:00 UTC of the date."""
    cfg = load_config(write(tmp_path, HOST))
    assert cfg.scoring.requesters == ("bank",)
    now = 1_800_000_000.0
    grant = cfg.scoring.grant("any", now=now)
    assert grant == ScoringGrant(
        model_id="any",
        requesters=frozenset({"bank"}),
        quota_rows=100_000,
        expires_at=now + 365 * 86400,
        quota_days=30.0,
    )
    cfg = load_config(
        write(
            tmp_path,
            HOST
            + """
[scoring]
quota_rows = 500
valid_days = 1.5

[scoring.models."credit-1"]
quota_rows = 20
expires = "2027-06-30"
requesters = []

[scoring.models."credit-2"]
expires = 2027-07-01
""",
        )
    )
    one = cfg.scoring.grant("credit-1", now=now)
    assert one.quota_rows == 20 and one.requesters == frozenset()
    assert one.expires_at == dt.datetime(2027, 6, 30, tzinfo=dt.UTC).timestamp()
    two = cfg.scoring.grant("credit-2", now=now)
    assert two.quota_rows == 500 and two.requesters == {"bank"}
    assert two.expires_at == dt.datetime(2027, 7, 1, tzinfo=dt.UTC).timestamp()
    assert cfg.scoring.grant("other", now=now).expires_at == now + 1.5 * 86400


def test_executor_section(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).executor == ExecutorSettings()  # local pool
    cfg = load_config(
        write(
            tmp_path,
            GOOD
            + '[executor]\nbackend = "ray"\nray_address = "10.1.0.5:6379"\nworkers = 64\n'
            + "allow_plaintext_cluster = true\n",
        )
    )
    assert cfg.executor == ExecutorSettings(
        backend=Backend.RAY, workers=64, ray_address="10.1.0.5:6379", allow_plaintext_cluster=True
    )
