"""A party's acceptance policy applied to what a guest asks of it (``[accept]`` config).

Roles: the host checks every ``JOB_START`` (and PSI ``HELLO``) a guest sends; the arbiter
checks every ``JOB_SPEC``. Each check raises :class:`JobRefusedError` with a reason that
names the rule and the config key, which the refusing party sends back to the guest: the
guest learns which of the party's limits its job broke (and the limit), nothing else.

Checks, in the order the host learns what it needs (``JobOffer`` of
:mod:`vfl.splitnn.session`):

1. the submitter is one of ``accept.guests`` and ``split_nn`` one of ``accept.job_types``;
2. the data alias is one of ``accept.data``; ``d <= max_d``, ``k <= max_k``; the guest's
   label-protection mode is one of ``accept.protect_modes``; a plaintext job needs
   ``accept.allow_plaintext``;
3. with the host's column count: the host bottom model's parameters (from ``d``, the
   guest's ``host_widths`` and the columns) ``<= max_host_params``;
4. with the arbiter's key: its size ``>= min_key_bits``.

The arbiter applies 1 (to the spec's guest), :func:`check_parties` (the spec's guest and
host are two different configured peers of those roles, and the sender is one of them),
and ``d``/``k``, plaintext and the key size of 2 and 4.

PSI (:func:`check_psi`, the host's ``[psi]`` policy, docs/protocol.md §3.4.1): 1 with job
type ``psi`` and the data alias of 2; then the mode is one of ``psi.modes``, the padding is
at least ``psi.min_pad_to``, and whatever the guest names of the alias (id column, id type,
timestamp column, duplicates policy) is what the host configured for it, which the host
then uses. Jobs that align on a PSI result (split NN, transfer) name the same columns
through :func:`host_id_column`; the host uses its own.

Horizontal (FedAvg) jobs: a client checks the coordinator's ``START`` with 1 (job type
``horizontal``), that the sender is the job's coordinator, the data alias of 2 and, once
its column count is known, the model's parameters ``<= max_host_params``; the aggregator
checks 1 against the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocols.errors import ConfigError, JobRefusedError
from protocols.roles import Party, Role, check_party_id
from psi.canon import IdType
from psi.protocol import PsiMode
from vfl.config import AcceptPolicy, JobType, PartyConfig, PsiDataPolicy
from vfl.fedavg.protocol import FedJob
from vfl.splitnn.job import JobOffer
from vfl.splitnn.spec import JobSpec
from vfl.splitnn.training import TrainConfig
from vfl.transfer.ftl import FtlProtect
from vfl.transfer.session import FtlJob, FtlSpec


def host_bottom_params(*, features: int, train: TrainConfig) -> int:
    """Parameters of the host bottom model (``features`` → ``host_widths[:-1]`` → ``d``),
    computed without building it (a guest could ask for one too large to build)."""
    return mlp_params(features=features, widths=(*train.host_widths[:-1], train.d))


def _is_party_id(value: str) -> bool:
    try:
        check_party_id(value)
    except ConfigError:
        return False
    return True


def _refuse(reason: str) -> JobRefusedError:
    """The refusal (sent to the guest as it is: it names the rule, not this party's files)."""
    return JobRefusedError(reason, public=reason)


def _psi_refusal(rule: str, detail: str) -> JobRefusedError:
    """A refusal under the ``[psi]`` policy: ``rule`` goes to the guest, ``detail`` (which may
    name this party's columns) only to this party's log."""
    public = f"refused by the host's [psi] policy: {rule}"
    return JobRefusedError(f"{public} ({detail})", public=public)


def check_psi(
    config: PartyConfig,
    *,
    guest: str,
    mode: PsiMode,
    pad_to: int | None,
    id_type: IdType,
    request: Mapping[str, Any],
) -> PsiDataPolicy:
    """The host's checks of a PSI ``HELLO`` (module docstring); returns the policy of the
    alias it names, which the host applies."""
    check_guest(config, guest=guest, job_type=JobType.PSI)
    alias = str(request.get("data", ""))
    check_data(config, alias=alias)
    policy = config.psi
    if mode not in policy.modes:
        allowed = ", ".join(sorted(m.value for m in policy.modes)) or "none"
        raise _psi_refusal(
            f"mode {mode.value!r} not allowed (psi.modes: {allowed})", f"requested {mode.value}"
        )
    if policy.min_pad_to and (pad_to is None or pad_to < policy.min_pad_to):
        raise _psi_refusal(
            f"padding below the minimum (psi.min_pad_to = {policy.min_pad_to})",
            f"requested pad_to {pad_to}",
        )
    data = policy.for_alias(alias)
    if data.id_type is not None and id_type is not data.id_type:
        raise _psi_refusal(
            f"id type {id_type.value!r} not allowed for data alias {alias!r} (psi id_type)",
            f"configured {data.id_type.value}",
        )
    host_id_column(config, request)
    stamp = request.get("timestamp_column")
    if stamp is not None and stamp != data.timestamp_column:
        raise _psi_refusal(
            f"timestamp column not allowed for data alias {alias!r} (psi timestamp_column)",
            f"requested {str(stamp)[:64]!r}, configured {data.timestamp_column!r}",
        )
    duplicates = request.get("duplicates")
    if duplicates is not None and duplicates != data.duplicates.value:
        raise _psi_refusal(
            f"duplicates policy {str(duplicates)[:16]!r} not allowed for data alias {alias!r} "
            f"(the host's is {data.duplicates.value!r})",
            "psi duplicates",
        )
    return data


def host_id_column(config: PartyConfig, request: Mapping[str, Any]) -> str:
    """The id column the host uses for the alias a guest's request names (its ``[psi]``
    policy); a request naming another column is refused."""
    alias = str(request.get("data", ""))
    column = config.psi.for_alias(alias).id_column
    asked = request.get("id_column")
    if asked is not None and asked != column:
        raise _psi_refusal(
            f"id column not allowed for data alias {alias!r} (psi id_column; omit it to use "
            "the host's)",
            f"requested {str(asked)[:64]!r}, configured {column!r}",
        )
    return column


def check_guest(config: PartyConfig, *, guest: str, job_type: JobType) -> None:
    """Check 1: ``guest`` may submit jobs of ``job_type`` here."""
    policy = config.accept
    if guest not in policy.guests:
        # a name a peer wrote into a spec is echoed only if it is a party id (no free text)
        named = guest if _is_party_id(guest) else "the named guest"
        raise _refuse(f"{named} may not submit jobs here (accept.guests)")
    if job_type not in policy.job_types:
        raise _refuse(f"{job_type.value} jobs are not accepted here (accept.job_types)")


def check_parties(config: PartyConfig, *, guest: str, host: str, sender: Party) -> None:
    """The arbiter's identity check of a JOB_SPEC (P1 of :mod:`protocols.crypto.policy`):
    its guest and host are two different configured peers with those roles, and the
    sender is one of them (so no party can register a job alone)."""
    roles = {p.party.party_id: p.party.role for p in config.peers}
    if guest == host:
        raise _refuse("a job's guest and host must be two different parties")
    if roles.get(guest) is not Role.GUEST:
        raise _refuse(f"{guest} is not a configured guest here ([[peers]])")
    if roles.get(host) is not Role.HOST:
        raise _refuse(f"{host} is not a configured host here ([[peers]])")
    if sender.party_id not in (guest, host):
        raise _refuse(f"{sender.party_id} is neither the guest nor the host of the job")


def check_data(config: PartyConfig, *, alias: str) -> None:
    """Part of check 2: a guest may name the data alias ``alias``."""
    if alias not in config.accept.data:
        raise _refuse(f"data alias {alias!r} is not offered to guests (accept.data)")


def _check_shapes(config: PartyConfig, *, d: int, k: int, encrypted: bool) -> None:
    policy: AcceptPolicy = config.accept
    if d > policy.max_d:
        raise _refuse(f"d = {d} exceeds accept.max_d = {policy.max_d}")
    if k > policy.max_k:
        raise _refuse(f"k = {k} exceeds accept.max_k = {policy.max_k}")
    if not encrypted and not policy.allow_plaintext:
        raise _refuse("plaintext jobs are not accepted (accept.allow_plaintext)")


def check_offer(config: PartyConfig, offer: JobOffer) -> None:
    """Checks 1-4 for a split-NN ``JOB_START`` at the host, as far as ``offer`` is known."""
    policy = config.accept
    job = offer.job
    check_guest(config, guest=offer.guest, job_type=JobType.SPLIT_NN)
    check_data(config, alias=str(offer.request.get("data", "")))
    _check_shapes(config, d=job.train.d, k=job.train.k, encrypted=job.encrypted)
    mode = job.train.protect.mode
    if mode not in policy.protect_modes:
        allowed = ", ".join(sorted(m.value for m in policy.protect_modes)) or "none"
        raise _refuse(
            f"label protection {mode.value!r} is not accepted (accept.protect_modes: {allowed})",
        )
    host_id_column(config, offer.request)
    if offer.features is not None:
        params = host_bottom_params(features=offer.features, train=job.train)
        if params > policy.max_host_params:
            # the count stays here: with the guest's widths it would give the host's columns
            public = (
                f"the host bottom model would have more parameters than "
                f"accept.max_host_params = {policy.max_host_params}"
            )
            raise JobRefusedError(f"{public} ({params})", public=public)
    if offer.key_bits is not None and offer.key_bits < policy.min_key_bits:
        raise _refuse(
            f"the arbiter's key has {offer.key_bits} bits, fewer than accept.min_key_bits = "
            f"{policy.min_key_bits}",
        )


def check_spec(config: PartyConfig, body: dict[str, Any], sender: Party) -> JobSpec | FtlSpec:
    """The arbiter's checks of a ``JOB_SPEC`` from ``sender``; returns the parsed spec."""
    if body.get("kind") == "ftl":
        return check_ftl_spec(config, body, sender)
    try:
        spec = JobSpec.from_json(body)
    except ConfigError as exc:
        raise _refuse(str(exc)) from None
    check_guest(config, guest=spec.guest, job_type=JobType.SPLIT_NN)
    check_parties(config, guest=spec.guest, host=spec.host, sender=sender)
    _check_shapes(config, d=spec.d, k=spec.k, encrypted=spec.encrypted)
    if spec.key_bits < config.accept.min_key_bits:
        raise _refuse(
            f"key of {spec.key_bits} bits < accept.min_key_bits = {config.accept.min_key_bits}",
        )
    return spec


def mlp_params(*, features: int, widths: tuple[int, ...]) -> int:
    """Parameters of an MLP ``features -> widths`` (weights and biases), without building it."""
    total, fan_in = 0, features
    for width in widths:
        total += fan_in * width + width
        fan_in = width
    return total


def check_fed_start(
    config: PartyConfig, job: FedJob, *, sender: str, features: int | None = None
) -> None:
    """A client's checks of a horizontal job's ``START`` (``features``: once known)."""
    check_guest(config, guest=sender, job_type=JobType.HORIZONTAL)
    if sender != job.coordinator:
        raise _refuse(f"{sender} sent the START of a job coordinated by {job.coordinator}")
    check_data(config, alias=job.data_alias(config.party.party_id))
    if features is not None:
        params = mlp_params(features=features, widths=job.widths)
        if params > config.accept.max_host_params:
            public = (
                "the model would have more parameters than accept.max_host_params "
                f"= {config.accept.max_host_params}"
            )
            raise JobRefusedError(f"{public} ({params})", public=public)


def check_fed_job(config: PartyConfig, job: FedJob, coordinator: Party) -> None:
    """The aggregator's check of a horizontal job (the coordinator's own JOIN): the
    coordinator may submit it, and its clients are at least two different configured
    guest or host peers (so no party runs a job alone)."""
    check_guest(config, guest=coordinator.party_id, job_type=JobType.HORIZONTAL)
    roles = {p.party.party_id: p.party.role for p in config.peers}
    clients = list(job.client_ids)
    if len(set(clients)) != len(clients) or len(clients) < 2:
        raise _refuse("a horizontal job needs at least two different clients")
    for client in clients:
        if roles.get(client) not in (Role.GUEST, Role.HOST):
            raise _refuse(f"{client} is not a configured guest or host here ([[peers]])")


def check_ftl_start(
    config: PartyConfig,
    job: FtlJob,
    *,
    sender: str,
    alias: str,
    features: int | None = None,
) -> None:
    """The host's checks of a transfer job's ``START`` (``features``: once known)."""
    check_guest(config, guest=sender, job_type=JobType.TRANSFER)
    check_data(config, alias=alias)
    if job.config.d > config.accept.max_d:
        raise _refuse(f"d = {job.config.d} exceeds accept.max_d = {config.accept.max_d}")
    if job.config.protect is FtlProtect.NONE and "none" not in {
        m.value for m in config.accept.protect_modes
    }:
        raise _refuse("label protection 'none' is not accepted (accept.protect_modes)")
    if features is not None:
        params = mlp_params(features=features, widths=(*job.host_widths, job.config.d))
        if params > config.accept.max_host_params:
            public = (
                "the host network would have more parameters than "
                f"accept.max_host_params = {config.accept.max_host_params}"
            )
            raise JobRefusedError(f"{public} ({params})", public=public)


def check_ftl_spec(config: PartyConfig, body: dict[str, Any], sender: Party) -> FtlSpec:
    """The arbiter's checks of a transfer job's ``JOB_SPEC``."""
    try:
        spec = FtlSpec.from_json(body)
    except ConfigError as exc:
        raise _refuse(str(exc)) from None
    check_guest(config, guest=spec.guest, job_type=JobType.TRANSFER)
    check_parties(config, guest=spec.guest, host=spec.host, sender=sender)
    if spec.d > config.accept.max_d:
        raise _refuse(f"d = {spec.d} exceeds accept.max_d = {config.accept.max_d}")
    if spec.key_bits < config.accept.min_key_bits:
        raise _refuse(
            f"key of {spec.key_bits} bits < accept.min_key_bits = {config.accept.min_key_bits}",
        )
    return spec
