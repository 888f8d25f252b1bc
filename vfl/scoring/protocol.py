"""Scoring new customers with a trained split NN (docs/protocol.md §5.1 online, §5.2 batch).

Roles and keys: the arbiter A keeps the Paillier key pair and, per model, a scoring grant
from its own operator's policy (who may request, a quota of rows, an expiry); the host H
keeps its saved part (bottom model, its share ``E``, G's share as ``[[W^G]]``); the guest G
keeps its saved part (bottom, ``W_g, b``, top). **The score exists only at G.**

What each party learns: G learns ``z_h`` of the customers it scores (as in training) and,
for a customer H does not hold, ``z_h`` of H's default embedding (the mean customer), which
may reveal non-membership (§5.1); H learns, online, the pseudonyms of each request (the
real one among ``decoys`` others) and which it resolved; in batch mode (PSI ``GUEST_ONLY``)
only ``|X'|`` and the number of scoring chunks; H also learns G's mask seed (uniform,
independent of everything); A learns tags, counts, digests and timing and decrypts only
uniformly masked values. A decrypts nothing H did not produce for the session (§5.4).

Steps (code comments cite them):

G1. G → A ``GRANT_REQ{model, grant id, key id, κ, rows per request}``; A grants only a
    model whose training it closed (P7 of :mod:`protocols.crypto.policy`), to that model's
    guest, with the model's ``κ``, within its operator's quota per window and expiry, and
    answers ``GRANT`` (or refuses with a reason).
G2. G → H ``OPEN{model, mode, id type, mask seed, X25519 public key (online) | PSI job
    (batch)}``;
    H loads its saved part and its data alias named in its manifest, computes ``α`` of every
    customer, and answers ``READY`` (with its X25519 key online, or ``|A_H|`` in batch) or
    a refusal. Online, both derive ``K_ps = HKDF-SHA256(X25519, salt = session id,
    info = "VFL-pseudonym-v1")`` and H keys its customers by ``HMAC-SHA256(K_ps, canon(id))``.
O1. (online, §5.1 F1) G → H ``INF_REQ{req}``: the request's pseudonyms (real one among
    decoys, in random order).
O2. (F2) H computes ``[[Ẑ]] = Obf(â ⊙ [[W^G]] ⊕ â·E)`` per pseudonym (the default
    embedding for pseudonyms it cannot resolve), adds G's masks (derived from the seed and
    ``req``), registers the masked ciphertexts' digests with A (``BIND``: group ``req``,
    at most 1 row), and once A confirmed sends them to G (``INF_F1{req}``).
O3. (F3) G forwards the real row's ciphertexts to A as they are (``INF_Z``, step = a fresh
    random request id), removes its masks and computes the score with its own part.
B1. (batch, §5.2) after a ``GUEST_ONLY`` PSI of the scoring population, H computes
    ``[[Ẑ]]`` for chunk ``c`` of the positions of ``A_H`` (the default embedding for its
    padding dummies, then one row more at position ``|A_H|``: the default embedding),
    masks and registers them as in O2 (group 0, at most ``|X'| + 1`` rows for the whole
    session: the size of G's scored list, which H learns from the PSI anyway, plus the
    default row) and sends ``INF_F1{c}``.
B2. G decrypts only the positions it matched (and the default row) under ``INF_Z``,
    while later chunks arrive; its unmatched customers get the default row's ``z_h``.
C1. G → H ``CLOSE``: H drops the session.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.masked import PendingDecryption, derived_masks
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PublicKey
from protocols.crypto.policy import ciphertext_digests
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, ControlBlock, Envelope, PlainBlock
from protocols.errors import (
    ConfigError,
    PolicyViolationError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.executor import Executor
from protocols.ids import check_identifier
from protocols.link import REFUSED, JobLink, refusal
from protocols.roles import Party
from protocols.transport.base import Channel, MessageFilter
from psi.canon import DuplicatePolicy, IdType, prepare_ids
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable
from vfl.models.split import Task
from vfl.splitnn.interactive import GuestLayer, HostLayer
from vfl.splitnn.saved import SavedModel, load_model
from vfl.splitnn.spec import DecTag, JobSpec
from vfl.splitnn.training import guest_scores

logger = logging.getLogger(__name__)

PSEUDONYM_INFO = b"VFL-pseudonym-v1"
CHUNK_ROWS = 1024  # rows per batch-scoring message and per decryption request


class ScoreTag(StrEnum):
    """Message tags of scoring (G1-C1)."""

    GRANT_REQ = "scoring.GRANT_REQ"
    GRANT = "scoring.GRANT"
    OPEN = "scoring.OPEN"
    READY = "scoring.READY"
    INF_REQ = "scoring.INF_REQ"
    INF_F1 = "scoring.INF_F1"
    CLOSE = "scoring.CLOSE"


class ScoreMode(StrEnum):
    """Online (one customer by id, §5.1) or batch (a file of customers, §5.2)."""

    ONLINE = "online"
    BATCH = "batch"


def grant_id(model_id: str) -> str:
    """The arbiter's job id of a model's scoring grant."""
    return f"{model_id}.scoring"


def _spec(model: SavedModel, *, job_id: str) -> JobSpec:
    spec = dict(model.manifest["spec"])
    spec["job_id"] = job_id
    return JobSpec.from_json(spec)


def _pseudonym_key(own: X25519PrivateKey, peer_public: bytes, session: str) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=session.encode(), info=PSEUDONYM_INFO
    ).derive(shared)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pseudonyms(key: bytes, canonical: Sequence[bytes]) -> list[bytes]:
    """``HMAC-SHA256(K_ps, canon(id))`` of each canonical id."""
    return [hmac.new(key, c, hashlib.sha256).digest() for c in canonical]


# ---------------------------------------------------------------------------------------
# host


@dataclass
class _HostSession:
    model: SavedModel
    layer: HostLayer
    alpha: np.ndarray  # every customer's embedding, in H's table order
    default: np.ndarray  # the mean customer's embedding (1 × d)
    index: dict[bytes, int]  # pseudonym -> row (online)
    seed: bytes  # G's mask seed (O2, B1)


class ScoringHost:
    """H's side: answers ``OPEN``/``INF_REQ``/``CLOSE`` (G2, O2, B1, C1).

    ``table_for(alias, id_column, features)`` loads the model's feature columns (its
    preprocessor's :class:`~vfl.data.features.FeatureSpec`) of one of H's own data
    aliases; ``allow(guest, model)`` raises a :class:`VflError` to refuse (H's acceptance
    policy); ``list_rows(psi_job, guest=, alias=, id_column=)`` gives H's list rows of a
    ``GUEST_ONLY`` PSI that guest ran on the model's alias and id column, and the size of
    G's list ``|X'|`` (batch scoring).
    """

    def __init__(
        self,
        *,
        channel: Channel,
        arbiter: Party,
        state_dir: Path,
        executor: Executor,
        table_for: Callable[[str, str, FeatureSpec], PartyTable],
        public_key: Callable[[], PublicKey],
        pool_executor: Executor | None = None,
        allow: Callable[[str, SavedModel], None] | None = None,
        list_rows: Callable[..., tuple[np.ndarray, int]] | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.channel, self.arbiter, self.state_dir = channel, arbiter, state_dir
        self.executor, self.table_for, self.public_key = executor, table_for, public_key
        self.pool_executor = pool_executor or executor
        self.allow, self.list_rows, self.timeout = allow, list_rows, timeout
        self._sessions: dict[tuple[str, str], _HostSession] = {}
        self._pools: dict[bytes, ObfuscatorPool] = {}
        self._lock = threading.Lock()
        channel.add_handler(MessageFilter.for_tags(ScoreTag.OPEN), self._on_open)
        channel.add_handler(MessageFilter.for_tags(ScoreTag.INF_REQ), self._on_request)
        channel.add_handler(MessageFilter.for_tags(ScoreTag.CLOSE), self._on_close)

    def close(self) -> None:
        """Stop the obfuscator pools."""
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def _link(self, request: Envelope) -> JobLink:
        """The link of ``request``'s scoring session (its job and run)."""
        return JobLink.answering(self.channel, request, timeout=self.timeout)

    def _pool(self, key: PublicKey) -> ObfuscatorPool:
        with self._lock:
            pool = self._pools.get(key.key_id)
            if pool is None:
                pool = ObfuscatorPool(key, executor=self.pool_executor)
                pool.keep_filled(256)
                self._pools[key.key_id] = pool
            return pool

    def _on_open(self, envelope: Envelope) -> None:
        """G2 at the host."""
        try:
            if not isinstance(envelope.body, ControlBlock):
                raise ProtocolError("OPEN carries no control block")
            body = envelope.body.obj()
            model_id = check_identifier(body.get("model_id"), what="OPEN model id")
            if envelope.job_id != grant_id(model_id):
                raise ProtocolError(
                    "OPEN names another model than its envelope",
                    public="OPEN names another model than its envelope",
                )
            model = load_model(self.state_dir, model_id)
            if envelope.job_id != grant_id(model.model_id):
                raise ProtocolError(
                    "OPEN names another model than its envelope",
                    public="OPEN names another model than its envelope",
                )
            if (
                model.manifest["role"] != "host"
                or model.manifest["peer"] != envelope.sender.party_id
            ):
                raise PolicyViolationError(
                    f"model {model.model_id} was not trained with {envelope.sender.party_id}"
                )
            if self.allow is not None:
                self.allow(envelope.sender.party_id, model)
            mode = ScoreMode(body["mode"])
            seed = bytes.fromhex(str(body["mask_seed"]))
            if len(seed) != 32:
                raise ProtocolError("OPEN's mask seed is not 32 bytes")
            key = self.public_key()
            key.check_key_id(model.key_id)
            data = model.manifest["data"]
            pre = model.preprocessor
            table = self.table_for(str(data["alias"]), str(data["id_column"]), pre.spec)
            x = pre.transform(table)
            bottom = model.host_module()
            with torch.no_grad():
                alpha = bottom(torch.tensor(x, dtype=torch.float32)).double().numpy()
                default = bottom(torch.zeros(1, x.shape[1])).double().numpy()
            layer = HostLayer(
                link=self._link(envelope),
                peer=envelope.sender,
                arbiter=self.arbiter,
                spec=_spec(model, job_id=envelope.job_id),
                cipher=PaillierCipher(key),
                pool=self._pool(key),
                executor=self.executor,
                fp=model.fixed_point,
            )
            layer.restore(model.big_ints)
            self.channel.fresh_stream(envelope.job_id, (envelope.sender, self.arbiter))
            reply: dict[str, Any] = {"accepted": True}
            index: dict[bytes, int] = {}
            if mode is ScoreMode.ONLINE:
                own = X25519PrivateKey.generate()
                k_ps = _pseudonym_key(own, bytes.fromhex(body["x25519"]), envelope.run_id)
                ids = prepare_ids(
                    list(table.ids), id_type=IdType(body["id_type"]), source=str(table.source)
                )
                index = dict(zip(pseudonyms(k_ps, ids.canonical), ids.rows.tolist(), strict=True))
                reply["x25519"] = _public_bytes(own).hex()
            session = _HostSession(
                model=model,
                layer=layer,
                alpha=alpha,
                default=default,
                index=index,
                seed=seed,
            )
            if mode is ScoreMode.BATCH:
                if self.list_rows is None:
                    raise ConfigError("batch scoring is not available at this host")
                psi_job = check_identifier(body.get("psi_job"), what="OPEN psi_job")
                rows, scored = self.list_rows(
                    psi_job,
                    guest=envelope.sender.party_id,
                    alias=str(data["alias"]),
                    id_column=str(data["id_column"]),
                )
                reply["positions"] = int(rows.size)
        except (VflError, KeyError, TypeError, ValueError) as exc:
            logger.warning("refused scoring session from %s: %s", envelope.sender, exc)
            self._link(envelope).reply(envelope, ScoreTag.READY, {REFUSED: _public(exc)})
            return
        with self._lock:
            self._sessions[(envelope.job_id, envelope.run_id)] = session
        self._link(envelope).reply(envelope, ScoreTag.READY, reply)
        logger.info(
            "scoring session for %s, model %s, mode %s: %d customers",
            envelope.sender.party_id,
            model.model_id,
            mode.value,
            len(alpha),
        )
        if mode is ScoreMode.BATCH:
            try:
                self._batch(envelope, session, rows, cap_rows=scored + 1)
            except (VflError, TimeoutError) as exc:
                logger.warning("batch scoring for %s stopped: %s", envelope.sender, exc)

    def _batch(
        self, envelope: Envelope, session: _HostSession, rows: np.ndarray, *, cap_rows: int
    ) -> None:
        """B1: ``[[Ẑ]]`` for every position of ``A_H``, then the default row."""
        alpha = np.vstack(
            [
                np.where((rows >= 0)[:, None], session.alpha[np.maximum(rows, 0)], session.default),
                session.default,
            ]
        )
        link = self._link(envelope)
        for c, start in enumerate(range(0, len(alpha), CHUNK_ROWS)):
            _, z = session.layer.forward(alpha[start : start + CHUNK_ROWS])
            try:
                z = self._bind(
                    envelope, session, z, step=c, group=0, cap_rows=cap_rows, first=c == 0
                )
            except (VflError, TimeoutError) as exc:
                link.reply(envelope, ScoreTag.INF_F1, {REFUSED: _public(exc)}, step=c)
                raise
            link.reply(envelope, ScoreTag.INF_F1, z.to_block(), step=c, key_id=session.model.key_id)

    def _bind(
        self,
        envelope: Envelope,
        session: _HostSession,
        z: EncryptedTensor,
        *,
        step: int,
        group: int,
        cap_rows: int,
        first: bool = True,
    ) -> EncryptedTensor:
        """O2/B1: add G's masks for ``step`` to ``z`` and register the masked ciphertexts
        with A (group ``group``, at most ``cap_rows`` rows of it decrypted); returns them
        once A confirmed."""
        n = z.cipher.key.n
        masks = np.empty(z.values.shape, dtype=object)
        masks.reshape(-1)[:] = derived_masks(
            n, session.seed, label=step, indices=range(z.values.size)
        )
        masked = z.add_plain(masks)
        block = masked.to_block()
        items = ciphertext_digests(session.model.key_id, block.data, masked.values.size)
        arbiter = ArbiterClient(link=self._link(envelope), arbiter=self.arbiter)
        arbiter.bind(step=step, group=group, cap_rows=cap_rows, first=first, digests=items)
        return masked

    def _on_request(self, envelope: Envelope) -> None:
        """O2 at the host."""
        with self._lock:
            session = self._sessions.get((envelope.job_id, envelope.run_id))
        if session is None or not isinstance(envelope.body, PlainBlock):
            logger.warning("INF_REQ from %s outside an open session", envelope.sender)
            return
        data = envelope.body.data
        if len(data) % 32 or not 0 < len(data) <= 32 * 64:
            logger.warning("malformed INF_REQ from %s", envelope.sender)
            return
        found = [session.index.get(data[i : i + 32]) for i in range(0, len(data), 32)]
        alpha = np.vstack(
            [session.default if r is None else session.alpha[r : r + 1] for r in found]
        )
        _, z = session.layer.forward(alpha)
        try:
            z = self._bind(
                envelope, session, z, step=envelope.step, group=envelope.step, cap_rows=1
            )
        except (VflError, TimeoutError) as exc:
            logger.warning("INF_REQ from %s not answered: %s", envelope.sender, exc)
            self._link(envelope).reply(envelope, ScoreTag.INF_F1, {REFUSED: _public(exc)})
            return
        key_id = session.model.key_id
        self._link(envelope).reply(envelope, ScoreTag.INF_F1, z.to_block(), key_id=key_id)

    def _on_close(self, envelope: Envelope) -> None:
        """C1 at the host."""
        with self._lock:
            self._sessions.pop((envelope.job_id, envelope.run_id), None)


# ---------------------------------------------------------------------------------------
# guest


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch, in the order of the table's rows."""

    scores: np.ndarray
    host_known: np.ndarray  # bool per row: H holds the customer
    seconds: float


class ScoringClient:
    """G's side: a scoring session for one saved model (G1, G2, O1, O3, B2, C1)."""

    def __init__(
        self,
        *,
        channel: Channel,
        host: Party,
        arbiter: Party,
        model: SavedModel,
        executor: Executor,
        public_key: PublicKey,
        timeout: float = 120.0,
    ) -> None:
        if model.manifest["role"] != "guest":
            raise ConfigError(f"model {model.model_id} here is not a guest's part")
        public_key.check_key_id(model.key_id)
        self.channel, self.host, self.arbiter = channel, host, arbiter
        self.model, self.timeout = model, timeout
        self.job_id = grant_id(model.model_id)
        self.run_id = secrets.token_hex(8)
        self.link = JobLink(
            channel=channel, job_id=self.job_id, run_id=self.run_id, timeout=timeout
        )
        self.spec = _spec(model, job_id=self.job_id)
        self.layer = GuestLayer(
            link=self.link,
            peer=host,
            arbiter=arbiter,
            spec=self.spec,
            cipher=PaillierCipher(public_key),
            pool=ObfuscatorPool(public_key, executor=executor),
            executor=executor,
            fp=model.fixed_point,
        )
        channel.fresh_stream(self.job_id, (host, arbiter))
        self.models = model.guest_module()
        self.task = Task(model.manifest["train"]["task"])
        self.preprocessor = model.preprocessor
        self._k_ps: bytes | None = None
        self._seed = secrets.token_bytes(32)  # masks H adds for this session (O2, B1)
        self._setup_step = 0
        self.id_type = IdType.GENERIC

    def _exchange(
        self, receiver: Party, tag: ScoreTag, reply: ScoreTag, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Send a setup message and wait for its answer (a fresh step for each exchange)."""
        self._setup_step += 1
        obj = self.link.ask(receiver, tag, reply, self._setup_step, body)
        reason = refusal(obj)
        if reason is not None:
            raise PolicyViolationError(f"{receiver.party_id} refused scoring: {reason}")
        return obj

    def grant(self) -> dict[str, Any]:
        """G1: ask the arbiter for this model's scoring grant."""
        body = {
            "model_id": self.model.model_id,
            "key_id": self.model.key_id.hex(),
            "kappa": self.spec.kappa_k,
            "max_rows": CHUNK_ROWS + 1,
        }
        return self._exchange(self.arbiter, ScoreTag.GRANT_REQ, ScoreTag.GRANT, body)

    def open_online(self, *, id_type: IdType = IdType.GENERIC) -> None:
        """G1 and G2 for online scoring."""
        self.grant()
        own = X25519PrivateKey.generate()
        body = {
            "model_id": self.model.model_id,
            "mode": ScoreMode.ONLINE.value,
            "id_type": id_type.value,
            "x25519": _public_bytes(own).hex(),
            "mask_seed": self._seed.hex(),
        }
        reply = self._exchange(self.host, ScoreTag.OPEN, ScoreTag.READY, body)
        self._k_ps = _pseudonym_key(own, bytes.fromhex(reply["x25519"]), self.run_id)
        self.id_type = id_type

    def score_one(
        self, customer_id: str, features: PartyTable, *, decoys: Sequence[str] = ()
    ) -> float:
        """O1-O3: the score of one customer (``features``: G's row of it, one row)."""
        if self._k_ps is None:
            raise ConfigError("call open_online() before score_one()")
        if len(features) != 1:
            raise ConfigError("score_one takes the customer's own row only")
        canonical = prepare_ids(
            [customer_id, *decoys], id_type=self.id_type, duplicates=DuplicatePolicy.FIRST
        )
        if canonical.rows.size == 0 or canonical.rows[0] != 0:
            raise ConfigError(f"customer id {customer_id[:40]!r} is not a valid identifier")
        ps = pseudonyms(self._k_ps, canonical.canonical)
        order = np.argsort([secrets.randbits(64) for _ in ps])
        real = int(np.flatnonzero(order == 0)[0])
        req = secrets.randbits(62)
        self.link.send(self.host, ScoreTag.INF_REQ, req, PlainBlock(b"".join(ps[i] for i in order)))
        z = self._z(self._tensor(req), np.array([real]), label=req)  # O3
        x = self.preprocessor.transform(features)
        return float(guest_scores(self.models, self.task, z, x).reshape(-1)[0])

    def _tensor(self, step: int) -> EncryptedTensor:
        env = self.link.recv(self.host, ScoreTag.INF_F1, step)
        if isinstance(env.body, ControlBlock):
            reason = env.body.obj().get("refused", "no reason given")
            raise PolicyViolationError(f"{self.host.party_id} could not answer: {reason}")
        if not isinstance(env.body, CipherBlock):
            raise ProtocolError("INF_F1 carries no ciphertexts")
        return EncryptedTensor.from_block(env.body, cipher=self.layer.cipher, key_id=env.key_id)

    def _subset(self, tensor: EncryptedTensor, rows: np.ndarray) -> EncryptedTensor:
        return EncryptedTensor(
            values=tensor.values[rows],
            cipher=tensor.cipher,
            scale=tensor.scale,
            packing=tensor.packing,
        )

    def _masks(self, tensor: EncryptedTensor, rows: np.ndarray, *, label: int) -> np.ndarray:
        """The masks H added to ``rows`` of a tensor it sent under ``label`` (O2, B1)."""
        width = tensor.values.shape[1]
        flat = (rows[:, None] * width + np.arange(width)).reshape(-1)
        masks = np.empty((len(rows), width), dtype=object)
        masks.reshape(-1)[:] = derived_masks(
            self.layer.n, self._seed, label=label, indices=(int(i) for i in flat)
        )
        return masks

    def _request(
        self, tensor: EncryptedTensor, rows: np.ndarray, *, label: int
    ) -> PendingDecryption:
        """O3/B2: ``rows`` of H's masked ciphertexts to A as they are (bound, §5.4)."""
        return self.layer.md.request(
            self._subset(tensor, rows),
            tag=DecTag.INF_Z,
            step=secrets.randbits(62),
            masks=self._masks(tensor, rows, label=label),
        )

    def _z(self, tensor: EncryptedTensor, rows: np.ndarray, *, label: int) -> np.ndarray:
        fp = self.model.fixed_point
        return self.layer.finish_reveal(
            self._request(tensor, rows, label=label),
            width=self.spec.k,
            scale=fp.f_z,
            bound=fp.z_bound(self.spec.d),
        )

    def score_batch(
        self, table: PartyTable, *, psi_job: str, rows: np.ndarray, positions: np.ndarray
    ) -> BatchScores:
        """G1, G2, B1-B2 after a ``GUEST_ONLY`` PSI: ``rows`` of ``table`` matched
        ``positions`` of H's list. Returns a score for every row of ``table``."""
        started = time.monotonic()
        self.grant()
        body = {
            "model_id": self.model.model_id,
            "mode": ScoreMode.BATCH.value,
            "psi_job": psi_job,
            "mask_seed": self._seed.hex(),
        }
        size = int(self._exchange(self.host, ScoreTag.OPEN, ScoreTag.READY, body)["positions"])
        if positions.size and (positions.min() < 0 or positions.max() >= size):
            raise ProtocolError("PSI positions fall outside the host's list")
        z_h = np.zeros((len(table), self.spec.k))
        known = np.zeros(len(table), dtype=bool)
        known[rows] = True
        by_position = np.full(size + 1, -1, dtype=np.int64)
        by_position[positions] = rows
        by_position[size] = len(table)  # the default row
        fp = self.model.fixed_point
        pending = []
        for c, start in enumerate(range(0, size + 1, CHUNK_ROWS)):
            tensor = self._tensor(c)  # B1
            targets = by_position[start : start + tensor.shape[0]]
            wanted = np.flatnonzero(targets >= 0)
            if wanted.size:  # B2: requested now, collected while later chunks arrive
                pending.append((targets[wanted], self._request(tensor, wanted, label=c)))
        z_default = np.zeros((1, self.spec.k))
        for target, request in pending:
            z = self.layer.finish_reveal(
                request, width=self.spec.k, scale=fp.f_z, bound=fp.z_bound(self.spec.d)
            )
            is_default = target == len(table)
            z_h[target[~is_default]] = z[~is_default]
            if is_default.any():
                z_default = z[is_default]
        z_h[~known] = z_default
        x = self.preprocessor.transform(table)
        scores = guest_scores(self.models, self.task, z_h, x)
        return BatchScores(scores=scores, host_known=known, seconds=time.monotonic() - started)

    def close(self) -> None:
        """C1."""
        self.link.send(self.host, ScoreTag.CLOSE, 0, {})
        self.layer.pool.close()


def _public(exc: BaseException) -> str:
    """What a refused peer is told (:func:`peer_reason`; malformed requests by kind)."""
    if isinstance(exc, KeyError | TypeError | ValueError) and not isinstance(exc, VflError):
        return f"malformed request ({type(exc).__name__})"
    return peer_reason(exc)
