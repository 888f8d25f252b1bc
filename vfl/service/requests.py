"""What a party's own operator may ask of its service: admin commands and typed requests.

Each admin command's JSON is parsed once, where it enters the service, into a frozen request
(:class:`ConfigError` naming the key and what to write otherwise); everything after that
works on typed fields. A request a service builds for itself (the PSI a job runs first, the
guest-only PSI of batch scoring) is built typed, never as a dict.

Ids a person chooses (a PSI's ``job_id``, a model, a job to release or cancel) are checked
as identifiers of at most :data:`~protocols.ids.MAX_USER_ID_LENGTH` characters here
(docs/protocol.md §2.9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import ConfigError
from protocols.ids import MAX_USER_ID_LENGTH, check_identifier
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode
from vfl.common.jobfile import TypedJob

E = TypeVar("E", bound=StrEnum)

MAX_PING_BYTES = 256 << 20


class AdminCommand(StrEnum):
    """Commands the party's own operator may send to its service."""

    STATUS = "status"
    PING = "ping"
    PSI = "psi"
    TRAIN = "train"
    SCORE = "score"
    CANCEL = "cancel"
    SET_PEER_ADDRESS = "set_peer_address"
    RELEASE = "release"  # [testing] allow_hold: end a job's hold_at_step


def _keys(data: Mapping[str, Any], what: str, known: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a JSON object")
    bad = set(data) - known
    if bad:
        raise ConfigError(f"{what}: unknown key(s) {sorted(bad)}; known: {sorted(known)}")


def _text(data: Mapping[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: {key} must be a non-empty string")
    return value


def _optional_text(data: Mapping[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{what}: {key} must be a string")
    return value


def _int(data: Mapping[str, Any], key: str, what: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{what}: {key} must be an integer in [{low}, {high}]")
    return value


def _choice(data: Mapping[str, Any], key: str, what: str, enum: type[E], default: E) -> E:
    value = data.get(key, default.value)
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(m.value for m in enum)
        raise ConfigError(f"{what}: {key} = {str(value)[:40]!r}; use one of {known}") from None


def _user_id(value: Any, what: str) -> str:
    return check_identifier(value, what=what, max_length=MAX_USER_ID_LENGTH, error=ConfigError)


@dataclass(frozen=True)
class JobIdRequest:
    """Admin ``release`` and ``cancel``: ``{"job_id": ...}``."""

    job_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, command: AdminCommand) -> JobIdRequest:
        """Parse an admin request naming one job."""
        what = f"{command.value} request"
        _keys(data, what, {"job_id"})
        return cls(job_id=_user_id(data.get("job_id"), f"{what}: job_id"))


@dataclass(frozen=True)
class TrainRequest:
    """Admin ``train``: a typed job and how to run it.

    Parameters
    ----------
    job
        The job, parsed by the driver of its kind.
    allow_plaintext
        The operator allows a split-NN job with ``plaintext = true`` (experiments only).
    hold_at_step
        ``[testing] allow_hold`` only: each run waits after this many steps until admin
        ``release`` (tests of restarts).
    """

    job: TypedJob[Any]
    allow_plaintext: bool = False
    hold_at_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as JSON (``request.json`` keeps its canonical text)."""
        out: dict[str, Any] = {
            "job_file": self.job.to_json(),
            "allow_plaintext": self.allow_plaintext,
        }
        if self.hold_at_step is not None:
            out["hold_at_step"] = self.hold_at_step
        return out

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        *,
        parse_job: Callable[[dict[str, Any], bool], TypedJob[Any]],
    ) -> TrainRequest:
        """Parse a ``train`` request; ``parse_job(job_file, allow_plaintext)`` is the
        driver table's parser (:func:`vfl.service.drivers.parse_job`)."""
        what = "train request"
        _keys(data, what, {"job_file", "allow_plaintext", "hold_at_step"})
        raw = data.get("job_file")
        if not isinstance(raw, dict):
            raise ConfigError(f"{what}: job_file must be the job file as a JSON object")
        plaintext = data.get("allow_plaintext", False)
        if not isinstance(plaintext, bool):
            raise ConfigError(f"{what}: allow_plaintext must be true or false")
        hold = data.get("hold_at_step")
        if hold is not None and (not isinstance(hold, int) or isinstance(hold, bool) or hold < 1):
            raise ConfigError("hold_at_step must be a positive integer (steps done)")
        return cls(job=parse_job(raw, plaintext), allow_plaintext=plaintext, hold_at_step=hold)


@dataclass(frozen=True)
class PsiRequest:
    """Admin ``psi`` (guest): align data alias ``data`` with the host's ``host_data``.

    The host decides its own columns and duplicates policy (its ``[psi]`` config); the
    ``host_*`` fields are sent only when given, and the host refuses values other than its
    own (docs/protocol.md §3.4.1).
    """

    peer: str
    data: str
    host_data: str | None = None  # default: the same alias as ``data``
    id_column: str = "id"
    id_type: IdType = IdType.GENERIC
    mode: PsiMode = PsiMode.BOTH
    pad_to: int | None = None
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR
    timestamp_column: str | None = None
    job_id: str | None = None  # default: a fresh one
    host_id_column: str | None = None
    host_duplicates: str | None = None
    host_timestamp_column: str | None = None

    def host_request(self) -> dict[str, Any]:
        """What ``HELLO`` names of the host's data."""
        out: dict[str, Any] = {"data": self.data if self.host_data is None else self.host_data}
        for key, value in (
            ("id_column", self.host_id_column),
            ("duplicates", self.host_duplicates),
            ("timestamp_column", self.host_timestamp_column),
        ):
            if value:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PsiRequest:
        """Parse an admin ``psi`` request (its ``job_id``, if given, is one a person chose)."""
        what = "psi request"
        _keys(data, what, {f.name for f in fields(cls)})
        pad_to = data.get("pad_to")
        if pad_to is not None and (
            not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 0
        ):
            raise ConfigError(f"{what}: pad_to must be a positive integer (the padded size)")
        job_id = data.get("job_id")
        return cls(
            peer=_text(data, "peer", what),
            data=_text(data, "data", what),
            host_data=_optional_text(data, "host_data", what),
            id_column=_text(data, "id_column", what, "id"),
            id_type=_choice(data, "id_type", what, IdType, IdType.GENERIC),
            mode=_choice(data, "mode", what, PsiMode, PsiMode.BOTH),
            pad_to=pad_to or None,
            duplicates=_choice(data, "duplicates", what, DuplicatePolicy, DuplicatePolicy.ERROR),
            timestamp_column=_optional_text(data, "timestamp_column", what),
            job_id=_user_id(job_id, "PSI job id") if job_id else None,
            host_id_column=_optional_text(data, "host_id_column", what),
            host_duplicates=_optional_text(data, "host_duplicates", what),
            host_timestamp_column=_optional_text(data, "host_timestamp_column", what),
        )


@dataclass(frozen=True)
class ScoreRequest:
    """Admin ``score`` (guest): online scores of ``ids``, or batch scores of every row of
    ``data`` into the CSV ``out`` (docs/protocol.md §5)."""

    model: str
    data: str
    id_column: str = "id"
    id_type: IdType = IdType.GENERIC
    ids: tuple[str, ...] | None = None  # online
    decoys: int = 0  # online: decoy pseudonyms per id
    out: Path | None = None  # batch
    host_id_column: str | None = None  # batch: default the host's [psi] column
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR  # batch: this party's PSI

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreRequest:
        """Parse an admin ``score`` request."""
        what = "score request"
        _keys(data, what, {f.name for f in fields(cls)})
        ids = data.get("ids")
        if ids is not None and (not isinstance(ids, list) or not ids):
            raise ConfigError(f"{what}: ids must be a non-empty list of customer ids")
        out = data.get("out")
        if ids is None and (not isinstance(out, str) or not Path(out).name):
            raise ConfigError("batch scoring needs an output file (out)")
        return cls(
            model=_user_id(data.get("model", ""), "model"),
            data=_text(data, "data", what),
            id_column=_text(data, "id_column", what, "id"),
            id_type=_choice(data, "id_type", what, IdType, IdType.GENERIC),
            ids=None if ids is None else tuple(str(i) for i in ids),
            decoys=_int(data, "decoys", what, 0, 0, 1000),
            out=None if ids is not None else Path(str(out)),
            host_id_column=_optional_text(data, "host_id_column", what),
            duplicates=_choice(data, "duplicates", what, DuplicatePolicy, DuplicatePolicy.ERROR),
        )


@dataclass(frozen=True)
class PingRequest:
    """Admin ``ping``: ``rounds`` PINGs of ``bytes`` random bytes to each of ``peers``
    (every configured peer when empty)."""

    peers: tuple[str, ...] = ()
    bytes: int = 1024
    rounds: int = 3

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, max_bytes: int) -> PingRequest:
        """Parse an admin ``ping`` request (``max_bytes``: the party's envelope limit)."""
        what = "ping request"
        _keys(data, what, {"peers", "bytes", "rounds"})
        peers = data.get("peers") or []
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise ConfigError("ping peers must be a list of party ids")
        most = min(MAX_PING_BYTES, max_bytes)
        size = data.get("bytes", 1024)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= most:
            raise ConfigError(
                f"ping bytes must be an integer in [0, {most}] (transport.max_envelope_bytes)"
            )
        rounds = data.get("rounds", 3)
        if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 1000:
            raise ConfigError("ping rounds must be an integer in [1, 1000]")
        return cls(peers=tuple(peers), bytes=size, rounds=rounds)


@dataclass(frozen=True)
class PeerAddressRequest:
    """Admin ``set_peer_address``: where a configured peer listens now."""

    peer: str
    address: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PeerAddressRequest:
        """Parse an admin ``set_peer_address`` request."""
        what = "set_peer_address request"
        _keys(data, what, {"peer", "address"})
        return cls(peer=_text(data, "peer", what), address=_text(data, "address", what))
