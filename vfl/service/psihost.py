"""The host's side of a guest's PSI inside its service (docs/protocol.md §3.4.1).

Roles: the guest G asks, with ``HELLO``, for a PSI on one of the host H's data aliases; H
answers under its own policy, G chooses only among what H allows. What each party learns
is §3.5; a refusal tells G which rule refused (:func:`protocols.errors.peer_reason`),
nothing of H's files, columns, rows or counts.

Steps at H:

1. check the ``HELLO`` against ``[accept]`` (guest, job type ``psi``, data alias) and
   ``[psi]`` (mode, least padding, and whatever G names of the alias must be H's own
   choice: id column, id type, timestamp column, duplicates policy),
   :func:`vfl.service.accept.check_psi`;
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
from pathlib import Path
from typing import Any

from protocols.envelope import Envelope
from protocols.errors import ConfigError, VflError, peer_reason
from protocols.executor import Executor
from protocols.transport.base import Channel
from psi.canon import DuplicatePolicy, IdType, PreparedIds, prepare_ids
from psi.protocol import PsiMode, read_hello, refuse, run_host
from psi.result import write_result
from vfl.config import PartyConfig
from vfl.data.ids import load_id_column
from vfl.service.accept import check_psi

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
