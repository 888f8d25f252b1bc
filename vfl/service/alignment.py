"""PSI inside the party services (docs/protocol.md §3.4.1): the guest's run, the host's answer.

Roles: the guest G asks, with ``HELLO``, for a PSI on one of the host H's data aliases; H
answers under its own policy, G chooses only among what H allows. What each party learns
is §3.5; a refusal tells G which rule refused (:func:`protocols.errors.peer_reason`),
nothing of H's files, columns, rows or counts.

At G (:func:`run_psi`: admin ``psi``, the PSI a split-NN or transfer job runs first, the
guest-only PSI of batch scoring): canonicalise its own ids, run steps 0-4 of
:mod:`psi.protocol` with what it names of H's data, write the result to
``<state_dir>/psi/<job_id>/``.

Steps at H (:func:`answer_psi`):

1. check the ``HELLO`` against ``[accept]`` (guest, job type ``psi``, data alias) and
   ``[psi]`` (mode, least padding, and whatever G names of the alias must be H's own
   choice: id column, id type, timestamp column, duplicates policy),
   :func:`vfl.service.accept.check_psi`; a PSI job id whose result here belongs to another
   guest is refused (``psi job id in use here``), so no guest overwrites another's result;
2. load the id column H's policy names and canonicalise it with H's duplicates policy; a
   failure (missing file or column, duplicate ids under ``error``, no usable id) is
   refused with its public reason, the details logged here;
3. run steps 0-4 of :mod:`psi.protocol` and write the result, with the alias, id column
   and guest it aligned (split-NN and transfer jobs that name the result are checked
   against them), to ``<state_dir>/psi/<job_id>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any

from protocols.envelope import Envelope
from protocols.errors import ConfigError, JobIdInUseError, VflError, peer_reason
from protocols.executor import Executor
from protocols.ids import check_identifier
from protocols.transport.base import Channel
from psi.canon import DuplicatePolicy, IdType, PreparedIds, prepare_ids
from psi.protocol import PsiMode, PsiOptions, read_hello, refuse, run_guest, run_host
from psi.result import read_summary, write_result
from vfl.config import PartyConfig
from vfl.data.ids import load_id_column
from vfl.service.accept import check_psi
from vfl.service.requests import PsiRequest

logger = logging.getLogger(__name__)


def prepare_alias(
    config: PartyConfig,
    alias: str,
    *,
    id_type: IdType,
    column: str,
    duplicates: DuplicatePolicy,
    timestamp_column: str | None = None,
) -> PreparedIds:
    """This party's ids of data alias ``alias``, canonicalised and deduplicated (§3.2)."""
    if alias not in config.data:
        known = ", ".join(sorted(config.data)) or "none"
        raise ConfigError(
            f"{config.party.party_id} has no data alias {alias!r} (aliases: {known})",
            public=f"no data alias {alias!r} here",
        )
    path = config.data[alias]
    ids, stamps = load_id_column(path, column, timestamp_column=timestamp_column)
    return prepare_ids(
        ids,
        id_type=id_type,
        duplicates=duplicates,
        timestamps=stamps,
        column=column,
        source=str(path),
    )


def run_psi(
    *, config: PartyConfig, channel: Channel, executor: Executor, request: PsiRequest
) -> dict[str, Any]:
    """G: align this party's alias ``request.data`` with the host's; returns the result's
    summary, its job id and folder."""
    peer = config.peer(request.peer).party
    job_id = check_identifier(
        request.job_id or f"psi-{uuid.uuid4().hex[:12]}", what="PSI job id", error=ConfigError
    )
    ids = prepare_alias(
        config,
        request.data,
        id_type=request.id_type,
        column=request.id_column,
        duplicates=request.duplicates,
        timestamp_column=request.timestamp_column,
    )
    result = run_guest(
        channel=channel,
        host=peer,
        job_id=job_id,
        ids=ids,
        executor=executor,
        options=PsiOptions(mode=request.mode, pad_to=request.pad_to),
        request=request.host_request(),
    )
    if request.mode is PsiMode.BOTH:  # training needs rows; other modes may well match none
        result.require_shared(detail=f"data {request.data!r}, id_type {request.id_type.value!r}")
    folder = write_result(config.state_dir, job_id, result)
    return {"job_id": job_id, "result_dir": str(folder), **result.summary}


PSI_IN_USE = (
    "psi job id in use here: a PSI result belongs to the guest that aligned it (choose another id)"
)


def _check_owner(config: PartyConfig, job_id: str, *, guest: str) -> None:
    """Step 1: refuse a PSI whose job id names another guest's result at this party (its
    ``peer``); the same guest may run it again (the new result replaces its own)."""
    try:
        summary = read_summary(config.state_dir, job_id)
    except (OSError, ValueError) as exc:  # unreadable: whose it is cannot be told
        raise JobIdInUseError(
            f"PSI {job_id}: its result cannot be read ({exc})", public=PSI_IN_USE
        ) from None
    owner = summary.get("peer") if isinstance(summary, dict) else None
    if owner is not None and owner != guest:
        raise JobIdInUseError(f"PSI {job_id} is {owner}'s, not {guest}'s", public=PSI_IN_USE)


def answer_psi(
    *,
    config: PartyConfig,
    channel: Channel,
    envelope: Envelope,
    executor: Executor,
    timeout: float = 3600.0,
) -> Path | None:
    """Steps 1-3 for one ``HELLO``; the result's folder, or ``None`` if it was refused or
    failed (logged here in full; the guest got the rule, or an ``ABORT``)."""
    hello = read_hello(envelope)
    request: Any = hello.get("request", {})
    if not isinstance(request, dict):
        request = {}
    alias = str(request.get("data", ""))
    pad_to = hello.get("pad_to")
    try:
        policy = check_psi(  # step 1
            config,
            guest=envelope.sender.party_id,
            mode=PsiMode(hello["mode"]),
            pad_to=pad_to if isinstance(pad_to, int) and not isinstance(pad_to, bool) else None,
            id_type=IdType(hello["id_type"]),
            request=request,
        )
        _check_owner(config, envelope.job_id, guest=envelope.sender.party_id)  # step 1
        ids = prepare_alias(  # step 2
            config,
            alias,
            id_type=IdType(hello["id_type"]),
            column=policy.id_column,
            duplicates=policy.duplicates,
            timestamp_column=policy.timestamp_column,
        )
    except VflError as exc:
        logger.warning("%s: refused PSI %s: %s", config.party.party_id, envelope.job_id, exc)
        refuse(channel, envelope, peer_reason(exc))
        return None
    logger.info(  # the count is for this party's own log only, never sent
        "%s: PSI %s with %s, mode %s, %d usable ids",
        config.party.party_id,
        envelope.job_id,
        envelope.sender,
        hello["mode"],
        len(ids.canonical),
    )
    try:
        result = run_host(  # step 3 (a refusal here, e.g. padding, names its rule only)
            channel=channel, hello_envelope=envelope, ids=ids, executor=executor, timeout=timeout
        )
    except (VflError, TimeoutError) as exc:
        logger.warning("%s: PSI %s failed: %s", config.party.party_id, envelope.job_id, exc)
        return None
    bound = {"data": alias, "id_column": policy.id_column, "peer": envelope.sender.party_id}
    result = dataclasses.replace(result, summary={**result.summary, **bound})
    folder = write_result(config.state_dir, envelope.job_id, result)
    logger.info("%s: PSI %s done, result in %s", config.party.party_id, envelope.job_id, folder)
    return folder
