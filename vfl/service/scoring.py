"""Scoring inside the party services (docs/protocol.md §5; protocol in :mod:`vfl.scoring.protocol`).

Roles: the arbiter's service keeps scoring grants under its ``[scoring]`` policy; the host's
service answers scoring sessions for models it saved, on its own data alias named in its
manifest, if its ``[accept]`` policy admits the guest and ``scoring`` jobs; the guest's
operator scores through its own service with the admin command ``score``:

* ``{"model", "data", "ids": [...]}``: online (§5.1), each id looked up in the guest's data
  alias ``data``; one session per model stays open, so later calls cost one request each;
* ``{"model", "data", "out"}``: batch (§5.2) for every row of ``data``: a ``GUEST_ONLY`` PSI
  with the host's data, then the scores, written atomically to the CSV ``out`` (guest side).

The request is parsed once into a :class:`~vfl.service.requests.ScoreRequest`.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.service import ArbiterService
from protocols.crypto.paillier import PublicKey
from protocols.errors import ConfigError, PolicyViolationError
from protocols.executor import Executor
from protocols.files import atomic_write, private_dir
from protocols.link import JobLink
from protocols.roles import Party, Role
from protocols.transport.base import Channel
from psi.canon import IdType
from psi.protocol import PsiMode
from psi.result import read_array, read_result, result_dir
from vfl.common.decision import Decision
from vfl.config import JobType, PartyConfig
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.scoring.grants import GrantKeeper
from vfl.scoring.protocol import ScoringClient, ScoringHost, grant_id
from vfl.service.accept import check_guest
from vfl.service.requests import PsiRequest, ScoreRequest
from vfl.splitnn.saved import SavedModel, load_model

logger = logging.getLogger(__name__)

SCORED_MARK = "scored"  # in a PSI result folder at the host: a batch scoring session used it


def fetch_public_key(
    channel: Channel, arbiter: Party, *, allow_test_key: bool, timeout: float = 30.0
) -> PublicKey:
    """The arbiter's public key (A1 of :mod:`protocols.arbiter.client`, outside any job's run:
    job ``scoring.key``, a fresh run id, sequence numbers from the current time)."""
    link = JobLink(
        channel=channel, job_id="scoring.key", run_id=secrets.token_hex(8), timeout=timeout
    )
    channel.restore_stream_state(link.job_id, {arbiter.party_id: time.time_ns() // 1000})
    client = ArbiterClient(link=link, arbiter=arbiter, allow_test_key=allow_test_key)
    return client.public_key()


def model_decision(model: SavedModel) -> Decision | None:
    """The calibration and threshold saved with a binary model (None for older models)."""
    raw = model.manifest.get("decision")
    return None if raw is None else Decision.from_json(raw)


class ScoringService:
    """A party service's part in scoring, by role."""

    def __init__(
        self,
        *,
        config: PartyConfig,
        channel: Channel,
        executor: Executor,
        run_psi: Callable[[PsiRequest], dict[str, Any]],
        arbiter_service: ArbiterService | None = None,
        pool_executor: Executor | None = None,
    ) -> None:
        self.config, self.channel, self.executor = config, channel, executor
        self.run_psi = run_psi
        self._lock = threading.Lock()
        self._tables: dict[
            tuple[str, str, FeatureSpec], tuple[float, PartyTable, dict[str, int]]
        ] = {}
        self._clients: dict[str, ScoringClient] = {}
        self._key: PublicKey | None = None
        self.host: ScoringHost | None = None
        role = config.party.role
        if role is Role.ARBITER and arbiter_service is not None:
            GrantKeeper(
                service=arbiter_service,
                channel=channel,
                grant_for=lambda model_id, first: config.scoring.grant(model_id, now=first),
                state_dir=config.state_dir,
            )
        elif role is Role.HOST:
            self.host = ScoringHost(
                channel=channel,
                arbiter=config.peer_with_role(Role.ARBITER),
                state_dir=config.state_dir,
                executor=executor,
                table_for=self.table,
                public_key=self.public_key,
                pool_executor=pool_executor,
                allow=self._allow,
                list_rows=self._list_rows,
            )

    def _list_rows(
        self, psi_job: str, *, guest: str, alias: str, id_column: str
    ) -> tuple[np.ndarray, int]:
        """H's list rows of a ``GUEST_ONLY`` PSI that ``guest`` ran with this party on the
        model's data ``alias`` and ``id_column``, and the size of G's list ``|X'|``. Each
        PSI is scored once (its folder keeps a mark): the arbiter's cap of ``|X'| + 1``
        rows holds per session, so a second session over the same PSI would double it."""
        summary, _ = read_result(self.config.state_dir, psi_job)
        bound = {"peer": guest, "data": alias, "id_column": id_column, "mode": "guest_only"}
        for key, wanted in bound.items():
            if summary.get(key) != wanted:
                public = f"PSI {psi_job} is not a guest-only PSI of yours on this model's data"
                raise PolicyViolationError(
                    f"{public} ({key} {summary.get(key)!r}, wanted {wanted!r})", public=public
                )
        rows = read_array(self.config.state_dir, psi_job, "list_rows")
        mark = result_dir(self.config.state_dir, psi_job) / SCORED_MARK
        with self._lock:
            if mark.exists():
                raise PolicyViolationError(
                    f"PSI {psi_job} was scored already; each batch scoring needs a new PSI"
                )
            atomic_write(mark, b"", mode=0o600)
        return rows, int(summary["peer_list_size"])

    def close(self) -> None:
        """Stop pools and sessions."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                logger.debug("closing a scoring session failed", exc_info=True)
        if self.host is not None:
            self.host.close()

    def public_key(self) -> PublicKey:
        """The arbiter's key, fetched once."""
        if self._key is None:
            self._key = fetch_public_key(
                self.channel,
                self.config.peer_with_role(Role.ARBITER),
                allow_test_key=self.config.allow_test_key,
            )
        return self._key

    def table(self, alias: str, id_column: str, features: FeatureSpec) -> PartyTable:
        """The model's feature columns (``features``, the model's
        :attr:`~vfl.data.preprocess.Preprocessor.spec`) of one of this party's data aliases
        (other columns, such as labels, are ignored), loaded once per file version."""
        return self._indexed(alias, id_column, features)[0]

    def _indexed(
        self, alias: str, id_column: str, features: FeatureSpec
    ) -> tuple[PartyTable, dict[str, int]]:
        """:meth:`table` with its row number per id, both kept until the file changes."""
        if alias not in self.config.data:
            known = ", ".join(sorted(self.config.data)) or "none"
            raise ConfigError(
                f"{self.config.party.party_id} has no data alias {alias!r} (aliases: {known})"
            )
        path = self.config.data[alias]
        stamp = path.stat().st_mtime if path.is_file() else 0.0
        key = (alias, id_column, features)
        with self._lock:
            cached = self._tables.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        table = load_table(TableSpec(path=path, id_column=id_column, features=features))
        index = {str(v): i for i, v in enumerate(table.ids)}
        with self._lock:
            self._tables[key] = (stamp, table, index)
        return table, index

    def _allow(self, guest: str, model: SavedModel) -> None:
        check_guest(self.config, guest=guest, job_type=JobType.SCORING)

    # -- guest -----------------------------------------------------------------------

    def _new_client(self, model: SavedModel, *, timeout: float = 120.0) -> ScoringClient:
        return ScoringClient(
            channel=self.channel,
            host=self.config.peer_with_role(Role.HOST),
            arbiter=self.config.peer_with_role(Role.ARBITER),
            model=model,
            executor=self.executor,
            public_key=self.public_key(),
            timeout=timeout,
        )

    def _client(self, model_id: str, id_type: IdType) -> ScoringClient:
        with self._lock:
            client = self._clients.get(model_id)
        if client is not None and client.id_type is id_type:
            return client
        client = self._new_client(load_model(self.config.state_dir, model_id))
        client.open_online(id_type=id_type)
        with self._lock:
            self._clients[model_id] = client
        return client

    def score(self, request: ScoreRequest) -> dict[str, Any]:
        """Admin ``score`` (module docstring)."""
        if self.config.party.role is not Role.GUEST:
            raise ConfigError("only the guest (label holder) scores customers")
        model_id, alias, id_column = request.model, request.data, request.id_column
        if request.ids is not None:  # the open session's model: no reload per call
            client = self._client(model_id, request.id_type)
            features = client.model.preprocessor.spec
            table, where = self._indexed(alias, id_column, features)
            try:
                return self._online(client, table, where, request.ids, decoys=request.decoys)
            except (PolicyViolationError, TimeoutError):
                with self._lock:  # the next call opens a new session
                    if self._clients.get(model_id) is client:
                        del self._clients[model_id]
                raise
        model = load_model(self.config.state_dir, model_id)
        table = self.table(alias, id_column, model.preprocessor.spec)
        return self._batch(model, table, request)

    def _online(
        self,
        client: ScoringClient,
        table: PartyTable,
        where: dict[str, int],
        ids: tuple[str, ...],
        *,
        decoys: int,
    ) -> dict[str, Any]:
        out = []
        for customer in ids:
            row = where.get(str(customer))
            if row is None:
                raise ConfigError(f"customer {str(customer)[:40]!r} is not in {table.source}")
            pool = [
                str(v) for v in table.ids[np.random.default_rng().integers(0, len(table), decoys)]
            ]
            started = time.perf_counter()
            score = client.score_one(str(customer), table.take(np.array([row])), decoys=pool)
            entry: dict[str, Any] = {"id": str(customer), "score": score}
            decision = model_decision(client.model)
            if decision is not None and isinstance(score, float):
                entry["probability"] = float(decision.calibrate(np.array([score]))[0])
                entry["decision"] = bool(decision.decide(np.array([score]))[0])
            entry["ms"] = 1e3 * (time.perf_counter() - started)
            out.append(entry)
        return {"model": client.model.model_id, "scores": out}

    def _batch(self, model: SavedModel, table: PartyTable, request: ScoreRequest) -> dict[str, Any]:
        started = time.monotonic()
        model_id = model.model_id
        out = request.out
        if out is None or not out.name:
            raise ConfigError("batch scoring needs an output file (out)")
        psi_job = f"{grant_id(model_id)}.psi-{secrets.token_hex(4)}"
        summary = self.run_psi(
            PsiRequest(
                peer=self.config.peer_with_role(Role.HOST).party_id,
                data=request.data,
                host_data=str(model.manifest["data"].get("host_alias", "")),
                id_column=request.id_column,
                host_id_column=request.host_id_column,  # default: the host's [psi]
                id_type=request.id_type,
                mode=PsiMode.GUEST_ONLY,
                job_id=psi_job,
                duplicates=request.duplicates,
            )
        )
        rows = read_array(self.config.state_dir, psi_job, "rows")
        positions = read_array(self.config.state_dir, psi_job, "peer_positions")
        client = self._new_client(model, timeout=600.0)
        try:
            scores = client.score_batch(table, psi_job=psi_job, rows=rows, positions=positions)
        finally:
            client.close()
        values = scores.scores
        frame = pd.DataFrame({"id": [str(v) for v in table.ids]})
        if values.ndim == 2 and values.shape[1] > 1:
            for c in range(values.shape[1]):
                frame[f"score_{c}"] = values[:, c]
        else:
            frame["score"] = values.reshape(-1)
        decision = model_decision(model)
        if decision is not None:  # the model's calibration and threshold (J7)
            frame["probability"] = decision.calibrate(values.reshape(-1))
            frame["decision"] = decision.decide(values.reshape(-1)).astype(int)
        frame["host_known"] = scores.host_known
        usable = table.id_rows()  # rows without an id: never matched, not reported (§3.2)
        if len(usable) < len(frame):
            logger.info("batch scoring: %d rows without an id left out", len(frame) - len(usable))
            frame = frame.iloc[usable]
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        private_dir(out.parent)  # applicant -> score: owner-only, as in the state folder
        atomic_write(out, buffer.getvalue().encode(), mode=0o600)
        seconds = time.monotonic() - started
        return {
            "model": model_id,
            "rows": len(frame),
            "host_known": int(frame["host_known"].sum()),
            "psi": {k: summary.get(k) for k in ("intersection_size", "job_id")},
            "out": str(out),
            "seconds": round(seconds, 3),
            "scoring_seconds": round(scores.seconds, 3),
            "rows_per_s": round(len(frame) / seconds, 1),
        }
