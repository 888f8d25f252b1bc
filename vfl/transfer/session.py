"""An FTL job between G (labelled source domain), H (unlabelled target domain) and A
(docs/protocol.md §6.3, §6.6), over any channel.

Roles and keys as in :mod:`vfl.transfer.ftl`: A holds ``sk_A`` and decrypts only masked
values under the job's policy (tags :class:`FtlDecTag`: ``FTL_GB`` for H, ``FTL_K``,
``FTL_LOSS`` and ``FTL_SCORE`` for G, or ``FTL_SCORE`` for H when H owns the scores).

Run (each step cites the T-steps of :mod:`vfl.transfer.ftl`):

R1. G fetches ``pk_A`` and sends ``START`` (the job) to H; H refuses a job whose id differs
    from the envelope's (docs/protocol.md §2.9), fetches ``pk_A`` and answers ``ACCEPT``
    with its column count; both register the same :class:`FtlSpec` with A.
R2. Each party standardises its own columns with statistics of its own rows.
R3. Epoch ``e``: G computes ``Φ`` over all its labelled rows and sends ``[[Φ̂]]`` (T0,
    ``PHI``); for each batch G sends ``BATCH`` (positions of overlap pairs in PSI order),
    H answers ``T1``, G sends ``[[ĝ^B]]`` (``GB``) and asks A for ``K`` and the loss
    (T2-T5); H decrypts its gradient through A and updates ``Net^B`` (T3); with γ > 0 H
    also sends its overlap representations in plaintext (``UB``, §6.4). At the end of the
    epoch G updates ``Net^A`` once over all its rows (T6).
R4. Validation (G's held-out overlap pairs) and scoring (H's rows, §6.6): G sends
    ``SCORE_REQ`` (positions in H's table), H sends ``[[û_j]]`` (``SCORE_U``), G computes
    ``[[ŝ_j]] = Φ̂ᵀ[[û_j]]`` and has it decrypted by A for itself, or sends it to H
    (``SCORE_S``) when H owns the scores. Plaintext host representations never reach G.
R5. G sends ``DONE``.
R6. With a state folder, each party saves its state at the start of every epoch (the two
    newest kept, owner-only, in ``<state_dir>/jobs/<job id>/ftl``, a path built with
    :func:`protocols.ids.state_path`); ``START`` and ``ACCEPT`` list the epochs each holds and the
    run resumes at the newest both hold (H loads it at the first ``PHI``). Step numbers of
    a run start at its run counter times ``2^32`` (sent in ``START``), so a resumed run
    never asks A for a step it served before; a run after the first is opened at A by both
    parties (``RESUME{run}``, P6 of :mod:`protocols.crypto.policy`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.masked import MaskedDecryptionClient
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PublicKey
from protocols.crypto.policy import JobPolicy, PolicyRule, StepWindow
from protocols.crypto.tensor import EncryptedTensor, plain_matmul
from protocols.envelope import CipherBlock, ControlBlock, Envelope, control_of
from protocols.errors import ConfigError, JobRefusedError, PolicyViolationError, ProtocolError
from protocols.executor import Executor
from protocols.files import atomic_write, private_dir
from protocols.ids import check_identifier, state_path
from protocols.roles import Party
from vfl.splitnn import checkpoint
from vfl.splitnn.metrics import binary_metrics
from vfl.transfer.ftl import (
    F_A,
    FtlConfig,
    FtlProtect,
    decode_g_b,
    decode_k,
    decode_loss,
    encode_u,
    encrypt_phi,
    guest_batch,
    host_t1,
    protect_noise,
    representation_net,
    to_signs,
)

logger = logging.getLogger(__name__)

SCORE_CHUNK = 512  # host rows per scoring request
SCORE_OFFSET = 2**31  # scoring steps of a run start here (R6)


def ftl_schedule(job: FtlJob, *, overlap: int, outside: int) -> tuple[int, int, int]:
    """The steps of a run (the JOB_SPEC's schedule): epochs, training steps per epoch, and the
    scoring steps of every validation and of H's rows outside the overlap. G and H each
    compute it from the job and the overlap and outside counts both know."""
    n_val = int(round(job.validation_fraction * overlap))
    chunks = math.ceil(n_val / SCORE_CHUNK) * job.epochs + math.ceil(outside / SCORE_CHUNK)
    return job.epochs, max((overlap - n_val) // job.config.batch, 1), max(chunks, 1)


def ftl_folder(state_dir: Path, job_id: str) -> Path:
    """R6: ``<state_dir>/jobs/<job_id>/ftl`` (:class:`~protocols.ids.UnsafePathError` unless
    the job id is an identifier and the folder stays in the state folder)."""
    return state_path(state_dir, "jobs", job_id, "ftl")


def claim_steps(folder: Path) -> int:
    """R6: this run's first step number, past every earlier run's (A serves each step once
    per tag): the run counter kept in the job's folder, times ``2^32``."""
    private_dir(folder)
    path = folder / "runs"
    runs = int(path.read_text()) + 1 if path.is_file() else 1
    atomic_write(path, f"{runs}\n".encode(), mode=0o600)
    return runs << 32


class FtlTag(StrEnum):
    """Messages between G and H (R1-R5)."""

    START = "ftl.START"
    ACCEPT = "ftl.ACCEPT"
    PHI = "ftl.PHI"
    BATCH = "ftl.BATCH"
    T1 = "ftl.T1"
    GB = "ftl.GB"
    UB = "ftl.UB"
    SCORE_REQ = "ftl.SCORE_REQ"
    SCORE_U = "ftl.SCORE_U"
    SCORE_S = "ftl.SCORE_S"
    DONE = "ftl.DONE"


class FtlDecTag(StrEnum):
    """What A decrypts for an FTL job (§2.6)."""

    GB = "ftl.FTL_GB"
    K = "ftl.FTL_K"
    LOSS = "ftl.FTL_LOSS"
    SCORE = "ftl.FTL_SCORE"
    VAL = "ftl.FTL_VAL"  # G's validation scores of held-out overlap pairs


class ScoreOwner(StrEnum):
    """Who receives the scores of H's customers (§6.6)."""

    GUEST = "guest"
    HOST = "host"


@dataclass(frozen=True)
class FtlSpec:
    """What G and H agree on and register with A (``kind = "ftl"``)."""

    job_id: str
    key_id: str
    key_bits: int
    batch: int
    d: int
    guest: str
    host: str
    score_owner: ScoreOwner = ScoreOwner.GUEST
    schedule: tuple[int, int, int] = (1, 1, 1)  # epochs, steps per epoch, scoring steps

    def policy(self, *, max_resumes: int = 100) -> JobPolicy:
        """A's decryption policy: per step ``B·d`` for H, ``d`` and 1 for G, up to
        ``SCORE_CHUNK`` scores per request for the score owner. Steps of run ``r`` are
        ``r·2^32 + offset`` (R6): training offsets ``< epochs × steps_per_epoch``, scoring
        offsets ``2^31 + i`` for ``i < score_steps``; at most ``max_resumes + 1`` runs,
        and per tag a budget of one whole schedule plus two epochs (training) or one
        scoring schedule (scores) per resume (P2-P5 of :mod:`protocols.crypto.policy`)."""
        owner = self.guest if self.score_owner is ScoreOwner.GUEST else self.host
        runs = max_resumes + 1
        epochs, steps_per_epoch, score_steps = self.schedule
        train = StepWindow(stop=epochs * steps_per_epoch, run_shift=32, max_runs=runs)
        score = StepWindow(
            start=SCORE_OFFSET, stop=SCORE_OFFSET + score_steps, run_shift=32, max_runs=runs
        )

        def rule(tag: FtlDecTag, requester: str, count: int, unit: int = 0) -> PolicyRule:
            window = score if unit else train
            rewind = window.steps if unit else 2 * steps_per_epoch
            return PolicyRule(
                tag.value,
                requester,
                count,
                unit=unit,
                window=window,
                rewind=rewind,
                budget=count * (window.steps + max_resumes * rewind),
            )

        return JobPolicy(
            job_id=self.job_id,
            key_id=bytes.fromhex(self.key_id),
            rules=(
                rule(FtlDecTag.GB, self.host, self.batch * self.d),
                rule(FtlDecTag.K, self.guest, self.d),
                rule(FtlDecTag.LOSS, self.guest, 1),
                rule(FtlDecTag.SCORE, owner, SCORE_CHUNK, unit=1),
                rule(FtlDecTag.VAL, self.guest, SCORE_CHUNK, unit=1),
            ),
            parties=(self.guest, self.host),
            max_resumes=max_resumes,
        )

    def to_json(self) -> dict[str, Any]:
        """The JOB_SPEC body."""
        out = asdict(self)
        out["score_owner"] = self.score_owner.value
        out["schedule"] = list(self.schedule)
        out["kind"] = "ftl"
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FtlSpec:
        """Parse a received JOB_SPEC, naming the field at fault."""
        try:
            return cls(
                job_id=str(obj["job_id"]),
                key_id=str(obj["key_id"]),
                key_bits=int(obj["key_bits"]),
                batch=int(obj["batch"]),
                d=int(obj["d"]),
                guest=str(obj["guest"]),
                host=str(obj["host"]),
                score_owner=ScoreOwner(obj.get("score_owner", "guest")),
                schedule=(
                    int(obj["schedule"][0]),
                    int(obj["schedule"][1]),
                    int(obj["schedule"][2]),
                ),
            )
        except KeyError as exc:
            raise ConfigError(f"FTL JOB_SPEC lacks field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"FTL JOB_SPEC is malformed: {exc}") from None


@dataclass(frozen=True)
class FtlJob:
    """An FTL job: the model (``config``), training and scoring parameters."""

    job_id: str = field(default_factory=lambda: f"ftl-{uuid.uuid4().hex[:12]}")
    config: FtlConfig = field(default_factory=FtlConfig)
    guest_widths: tuple[int, ...] = (32,)
    host_widths: tuple[int, ...] = (32,)
    epochs: int = 20
    patience: int = 3
    guest_lr: float = 0.01
    host_lr: float = 0.003
    weight_decay: float = 0.0
    validation_fraction: float = 0.2
    score_owner: ScoreOwner = ScoreOwner.GUEST

    def __post_init__(self) -> None:
        # it names a folder in each party's state (docs/protocol.md §2.9)
        check_identifier(self.job_id, what="job id", error=ConfigError)

    def to_json(self) -> dict[str, Any]:
        """The job as JSON (``START``)."""
        out = asdict(self)
        out["config"]["protect"] = self.config.protect.value
        out["score_owner"] = self.score_owner.value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FtlJob:
        """Parse :meth:`to_json` output (``ConfigError`` naming the problem)."""
        try:
            raw = dict(obj["config"])
            raw["protect"] = FtlProtect(raw["protect"])
            return cls(
                job_id=check_identifier(obj["job_id"], what="FTL job id"),
                config=FtlConfig(**raw),
                guest_widths=tuple(int(w) for w in obj["guest_widths"]),
                host_widths=tuple(int(w) for w in obj["host_widths"]),
                epochs=int(obj["epochs"]),
                patience=int(obj["patience"]),
                guest_lr=float(obj["guest_lr"]),
                host_lr=float(obj["host_lr"]),
                weight_decay=float(obj["weight_decay"]),
                validation_fraction=float(obj["validation_fraction"]),
                score_owner=ScoreOwner(obj["score_owner"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed FTL job: {type(exc).__name__}: {exc}") from None


def standardise(x: np.ndarray) -> np.ndarray:
    """R2: each party's own columns, by statistics of its own rows (float32)."""
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    z = np.asarray((x - mean) / np.where(std > 1e-12, std, 1.0), dtype=np.float64)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)


class _Peer:
    """Sends and receives of one run."""

    def __init__(self, *, channel: Any, job_id: str, run_id: str, timeout: float) -> None:
        self.channel, self.job_id, self.run_id, self.timeout = channel, job_id, run_id, timeout

    def send(self, to: Party, tag: StrEnum, step: int, body: ControlBlock | CipherBlock) -> None:
        self.channel.send(
            Envelope(
                job_id=self.job_id,
                run_id=self.run_id,
                sender=self.channel.me,
                receiver=to,
                tag=tag,
                step=step,
                body=body,
            )
        )

    def recv(self, sender: Party, tag: StrEnum, step: int) -> Envelope:
        envelope: Envelope = self.channel.recv(
            job_id=self.job_id,
            run_id=self.run_id,
            sender=sender,
            tag=tag,
            step=step,
            timeout=self.timeout,
        )
        return envelope

    def control(self, sender: Party, tag: StrEnum, step: int = 0) -> dict[str, Any]:
        envelope = self.recv(sender, tag, step)
        if not isinstance(envelope.body, ControlBlock):
            raise ProtocolError(f"{tag.value} from {sender.party_id} must be JSON")
        return envelope.body.obj()

    def cipher_tensor(
        self, sender: Party, tag: StrEnum, step: int, cipher: PaillierCipher
    ) -> EncryptedTensor:
        envelope = self.recv(sender, tag, step)
        if not isinstance(envelope.body, CipherBlock):
            raise ProtocolError(f"{tag.value} from {sender.party_id} must carry ciphertexts")
        return EncryptedTensor.from_block(envelope.body, cipher=cipher, key_id=cipher.key.key_id)


def fetch_key(peer: _Peer, arbiter: Party, *, allow_test_key: bool) -> PublicKey:
    """R1: ``pk_A`` from A."""
    from protocols.crypto.arbiter import SetupTag

    peer.send(arbiter, SetupTag.KEY_REQ, 0, ControlBlock.from_obj({}))
    obj = peer.control(arbiter, SetupTag.KEY)
    return PublicKey.from_json(obj["public_key"], allow_test_key=allow_test_key)


def open_run(peer: _Peer, arbiter: Party, run: int) -> None:
    """R6: a run after the first (run number > 1) is opened at A by both parties
    (``RESUME{run}``, P6 of :mod:`protocols.crypto.policy`); A refuses steps of a run not
    opened so."""
    from protocols.crypto.arbiter import SetupTag

    if run <= 1:
        return
    body = ControlBlock.from_obj({"step": 0, "run": run})
    peer.send(arbiter, SetupTag.RESUME, run, body)
    obj = peer.control(arbiter, SetupTag.RESUMED, run)
    if "refused" in obj:
        raise PolicyViolationError(f"the arbiter refused run {run}: {obj['refused']}")


def register(peer: _Peer, arbiter: Party, spec: FtlSpec) -> None:
    """R1: the JOB_SPEC; A answers once G and H sent the same."""
    from protocols.crypto.arbiter import SetupTag

    peer.send(arbiter, SetupTag.JOB_SPEC, 0, ControlBlock.from_obj(spec.to_json()))
    obj = peer.control(arbiter, SetupTag.JOB_READY)
    if "refused" in obj:
        raise ProtocolError(f"the arbiter refused FTL job {spec.job_id}: {obj['refused']}")


@dataclass(frozen=True)
class FtlResult:
    """G's view of a finished job."""

    job_id: str
    epochs: int
    best_epoch: int
    history: tuple[dict[str, float], ...]
    scores: np.ndarray | None  # scores of H's requested rows, if G owns them
    seconds: float
    validation: tuple[list[int], list[float]] = ([], [])
    # labels (0/1) and scores of the held-out overlap pairs at the best epoch


class FtlGuest:
    """G's side (R1-R5). ``overlap`` holds G's row of each PSI overlap pair, in PSI order."""

    def __init__(
        self,
        *,
        channel: Any,
        host: Party,
        arbiter: Party,
        job: FtlJob,
        features: np.ndarray,
        labels: np.ndarray,
        overlap: np.ndarray,
        executor: Executor,
        pool: ObfuscatorPool | None = None,
        allow_test_key: bool = False,
        seed: int | None = None,
        timeout: float = 600.0,
        progress: Callable[[dict[str, Any]], None] | None = None,
        host_request: dict[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.channel, self.host, self.arbiter, self.job = channel, host, arbiter, job
        self.folder = None if state_dir is None else ftl_folder(state_dir, job.job_id)
        self.host_request = dict(host_request or {})  # which of H's data (alias, PSI)
        self.key_id: str | None = None
        self.stopped = False
        self.x = standardise(np.asarray(features, dtype=np.float64))  # R2
        self.y = to_signs(labels)
        self.overlap = np.asarray(overlap, dtype=np.int64)
        self.executor, self._pool = executor, pool
        self.allow_test_key, self.timeout = allow_test_key, timeout
        self.seed = secrets.randbits(63) if seed is None else seed
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:16]

    def stop(self) -> None:
        """End the run: a waiting receive raises :class:`RunAbortedError`."""
        self.stopped = True
        self.channel.abort_run(self.job.job_id, self.run_id)

    def run(self, *, score_outside: bool = False) -> FtlResult:
        """Train, then (``score_outside``) score every row of H outside the overlap (§6.6)."""
        job, cfg = self.job, self.job.config
        started = time.monotonic()
        peer = _Peer(
            channel=self.channel, job_id=job.job_id, run_id=self.run_id, timeout=self.timeout
        )
        key = fetch_key(peer, self.arbiter, allow_test_key=self.allow_test_key)  # R1
        self.key_id = key.key_id.hex()
        held = [] if self.folder is None else checkpoint.available_steps(self.folder)
        base = 0 if self.folder is None else claim_steps(self.folder)  # R6
        start = {
            "job": job.to_json(),
            "request": self.host_request,
            "held": held,
            "run": base >> 32,
        }
        peer.send(self.host, FtlTag.START, 0, ControlBlock.from_obj(start))
        accept = peer.control(self.host, FtlTag.ACCEPT)
        if not accept.get("ok"):
            raise JobRefusedError(
                f"{self.host.party_id} refused job {job.job_id}: {accept.get('reason')}"
            )
        outside = int(accept.get("outside", 0))
        common = set(held) & {int(e) for e in accept.get("held", [])}
        resume = max(common) if common else 0  # R6: the newest epoch both parties hold
        spec = FtlSpec(
            job_id=job.job_id,
            key_id=key.key_id.hex(),
            key_bits=key.bits,
            batch=cfg.batch,
            d=cfg.d,
            guest=self.channel.me.party_id,
            host=self.host.party_id,
            score_owner=job.score_owner,
            schedule=ftl_schedule(job, overlap=len(self.overlap), outside=outside),
        )
        register(peer, self.arbiter, spec)
        open_run(peer, self.arbiter, base >> 32)
        cipher = PaillierCipher(key)
        pool = self._pool or ObfuscatorPool(key, executor=self.executor)
        md = MaskedDecryptionClient(
            channel=self.channel, arbiter=self.arbiter, cipher=cipher, timeout=self.timeout
        )
        if self.folder is not None:  # R6: a resumed run must draw the same validation pairs
            seed_file = self.folder / "seed"
            if seed_file.is_file():
                self.seed = int(seed_file.read_text())
            else:
                atomic_write(seed_file, f"{self.seed}\n".encode(), mode=0o600)
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed % 2**31)
        net = representation_net(self.x.shape[1], job.guest_widths, cfg.d)
        optimizer = torch.optim.Adam(
            net.parameters(), lr=job.guest_lr, weight_decay=job.weight_decay
        )
        pairs = rng.permutation(len(self.overlap))
        n_val = int(round(job.validation_fraction * len(pairs)))
        val_pairs, train_pairs = np.sort(pairs[:n_val]), pairs[n_val:]
        if len(train_pairs) < cfg.batch:
            raise ConfigError(
                f"{len(train_pairs)} overlap pairs for training, fewer than one batch of "
                f"{cfg.batch}"
            )
        x_all = torch.from_numpy(self.x)
        y_all = torch.from_numpy(self.y)
        steps = len(train_pairs) // cfg.batch
        history: list[dict[str, float]] = []
        best, best_epoch, best_state, waited = -math.inf, 0, net.state_dict(), 0
        score_step = base + SCORE_OFFSET
        phi = np.zeros(cfg.d)
        best_phi = phi
        best_val: list[list[Any]] = [[], []]
        epoch_val: list[list[Any]] = [[], []]
        enc_phi: EncryptedTensor | None = None
        if resume and self.folder is not None:  # R6
            saved = checkpoint.load(self.folder, resume)
            net.load_state_dict(saved.tree("net"))
            optimizer.load_state_dict(saved.tree("optimizer"))
            best_state = saved.tree("best")
            meta = saved.meta
            history, best, best_epoch = (
                list(meta["history"]),
                float(meta["best"]),
                int(meta["best_epoch"]),
            )
            waited, best_phi = int(meta["waited"]), np.asarray(meta["best_phi"])
            best_val = meta.get("best_val", [[], []])
            rng.bit_generator.state = meta["rng"]
            logger.info("FTL job %s resumes at epoch %d", job.job_id, resume)
        for epoch in range(resume, job.epochs):  # R3
            epoch_started = time.monotonic()
            if self.folder is not None and epoch > resume:  # R6: the state at its start
                checkpoint.save(
                    self.folder,
                    epoch,
                    trees={
                        "net": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "best": best_state,
                    },
                    big_ints={},
                    meta={
                        "history": history,
                        "best": best,
                        "best_epoch": best_epoch,
                        "waited": waited,
                        "best_phi": best_phi.tolist(),
                        "best_val": best_val,
                        "rng": rng.bit_generator.state,
                    },
                )
                checkpoint.prune(self.folder, keep=[epoch - 1, epoch])
            net.train()
            u_a = net(x_all)
            phi_t = (y_all[:, None] * u_a).mean(dim=0)
            phi = phi_t.detach().double().numpy()
            enc_phi = encrypt_phi(phi, cipher=cipher, pool=pool)  # T0
            peer.send(self.host, FtlTag.PHI, epoch, enc_phi.to_block())
            k_bar = np.zeros(cfg.d)
            align = np.zeros((len(self.x), cfg.d))
            losses = []
            order = rng.permutation(train_pairs)
            for i in range(steps):
                t = base + epoch * steps + i
                batch = np.sort(order[i * cfg.batch : (i + 1) * cfg.batch])
                peer.send(
                    self.host, FtlTag.BATCH, t, ControlBlock.from_obj({"pairs": batch.tolist()})
                )
                rows = self.overlap[batch]
                enc_u = peer.cipher_tensor(self.host, FtlTag.T1, 2 * t, cipher)
                enc_q = peer.cipher_tensor(self.host, FtlTag.T1, 2 * t + 1, cipher)
                u_a_rows = u_a[rows].detach().double().numpy()
                addend = protect_noise(phi, len(batch), config=cfg, generator=rng)
                if cfg.gamma > 0:  # §6.4: only with reveal_overlap_repr (FtlConfig checks)
                    addend = addend - cfg.gamma * cfg.kappa * u_a_rows
                out = guest_batch(  # T2, T4, T5
                    enc_u,
                    enc_q,
                    phi=phi,
                    y=self.y[rows],
                    addend=addend,
                    config=cfg,
                    cipher=cipher,
                    pool=pool,
                    executor=self.executor,
                )
                peer.send(self.host, FtlTag.GB, t, out.g_b.to_block())
                k_req = md.request(
                    out.four_k, job_id=job.job_id, tag=FtlDecTag.K, step=t, run_id=self.run_id
                )
                l_req = md.request(
                    out.lam, job_id=job.job_id, tag=FtlDecTag.LOSS, step=t, run_id=self.run_id
                )
                k = decode_k(md.collect(k_req), n=key.n)
                loss = decode_loss(md.collect(l_req), n=key.n, rows=len(batch), config=cfg)
                k_bar += k
                if cfg.gamma > 0:
                    u_b = np.asarray(peer.control(self.host, FtlTag.UB, t)["u"], dtype=np.float64)
                    align[rows] += -cfg.gamma * cfg.kappa * u_b
                    loss += cfg.gamma * float(np.sum(-cfg.kappa * u_a_rows * u_b))
                losses.append(loss / len(batch))
            # T6: ∂L/∂u^A_j = α_L y_j K̄ / N_A (+ the alignment gradients), one update
            grad = cfg.alpha * self.y[:, None] * k_bar[None, :] / len(self.x) + align
            optimizer.zero_grad()
            u_a.backward(torch.from_numpy(grad).to(u_a.dtype))
            optimizer.step()
            record: dict[str, float] = {"epoch": float(epoch + 1), "loss": float(np.mean(losses))}
            if len(val_pairs):  # R4 on the held-out pairs, with this epoch's Φ
                scores, score_step = self._score(
                    peer,
                    md,
                    cipher,
                    pool,
                    phi,
                    self.overlap_host_rows(val_pairs),
                    score_step,
                    epoch + 1,
                )
                if scores is not None:
                    truth = self.y[self.overlap[val_pairs]] > 0
                    probability = 1.0 / (1.0 + np.exp(-scores))  # φ is a logit (§6.1)
                    metrics = binary_metrics(truth, probability)
                    epoch_val = [truth.astype(int).tolist(), scores.tolist()]
                    record.update({f"val_{k}": v for k, v in metrics.items()})
            record["seconds"] = time.monotonic() - epoch_started
            history.append(record)
            if self.progress is not None:
                self.progress(record)
            current = record.get("val_roc_auc", -record["loss"])
            if current > best:
                best, best_epoch, waited = current, epoch + 1, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
                best_phi = phi.copy()
                best_val = epoch_val
            else:
                waited += 1
                if waited >= job.patience:
                    break
        net.load_state_dict(best_state)
        phi = best_phi
        if best_epoch == 0:
            raise ProtocolError(f"FTL job {job.job_id}: no epoch was trained")
        final_scores = None
        if score_outside and outside:  # R4: H's customers outside the overlap (§6.6)
            final_scores, score_step = self._score(
                peer, md, cipher, pool, phi, np.arange(outside), score_step, best_epoch
            )
        peer.send(self.host, FtlTag.DONE, 0, ControlBlock.from_obj({"best_epoch": best_epoch}))
        return FtlResult(
            job_id=job.job_id,
            epochs=len(history),
            best_epoch=best_epoch,
            history=tuple(history),
            scores=final_scores,
            validation=(list(best_val[0]), list(best_val[1])),
            seconds=time.monotonic() - started,
        )

    def overlap_host_rows(self, pairs: np.ndarray) -> np.ndarray:
        """Pair positions for H's scoring request (H maps them to its rows)."""
        return -1 - np.asarray(pairs, dtype=np.int64)  # negative: overlap pair positions

    def _score(
        self,
        peer: _Peer,
        md: MaskedDecryptionClient,
        cipher: PaillierCipher,
        pool: ObfuscatorPool,
        phi: np.ndarray,
        rows: np.ndarray,
        step: int,
        epoch: int,
    ) -> tuple[np.ndarray | None, int]:
        """R4: ``φ_j = Φ·u^B_j`` for H's ``rows``, in chunks. Validation: every row negative
        (overlap pair ``−1−p``), decrypted for G, which holds their labels (``FTL_VAL``);
        scoring: positions among H's rows outside the overlap, decrypted for G or handed to
        H, whichever owns the scores (``FTL_SCORE``). ``epoch`` names the model: H keeps
        its network of each validated epoch and scores with the one of the epoch G kept."""
        validation = bool(len(rows)) and bool(np.all(rows < 0))
        if not validation and np.any(rows < 0):
            raise ProtocolError("a scoring request mixes overlap pairs and other rows")
        phi_hat = encode_u(phi).reshape(1, -1)
        out = []
        for start in range(0, len(rows), SCORE_CHUNK):
            chunk = rows[start : start + SCORE_CHUNK]
            peer.send(
                self.host,
                FtlTag.SCORE_REQ,
                step,
                ControlBlock.from_obj({"rows": chunk.tolist(), "epoch": epoch}),
            )
            enc_u = peer.cipher_tensor(self.host, FtlTag.SCORE_U, step, cipher)
            enc_u_t = EncryptedTensor(cipher=cipher, values=enc_u.values.T.copy(), scale=F_A)
            s = plain_matmul(phi_hat, enc_u_t, executor=self.executor, scale=2 * F_A)
            s = s.obfuscate(pool)
            if self.job.score_owner is ScoreOwner.HOST and not validation:
                peer.send(self.host, FtlTag.SCORE_S, step, s.to_block())
            else:
                from protocols.crypto.fixedpoint import decode

                tag = FtlDecTag.VAL if validation else FtlDecTag.SCORE
                residues = md.decrypt(
                    s, job_id=self.job.job_id, tag=tag, step=step, run_id=self.run_id
                )
                out.append(decode(residues, cipher.key.n, scale=2 * F_A, bound=1e6).reshape(-1))
            step += 1
        return (np.concatenate(out) if out else None), step


class FtlHost:
    """H's side: ``overlap`` holds H's row of each PSI overlap pair, in PSI order."""

    def __init__(
        self,
        *,
        channel: Any,
        guest: Party,
        arbiter: Party,
        features: np.ndarray,
        overlap: np.ndarray,
        executor: Executor,
        pool: ObfuscatorPool | None = None,
        allow_test_key: bool = False,
        seed: int | None = None,
        timeout: float = 600.0,
        state_dir: Path | None = None,
    ) -> None:
        self.channel, self.guest, self.arbiter = channel, guest, arbiter
        self.state_dir = state_dir
        self.x = standardise(np.asarray(features, dtype=np.float64))  # R2
        self.overlap = np.asarray(overlap, dtype=np.int64)
        self.executor, self._pool = executor, pool
        self.allow_test_key, self.timeout = allow_test_key, timeout
        self.seed = secrets.randbits(63) if seed is None else seed
        self.outside = np.setdiff1d(np.arange(len(self.x)), self.overlap)  # rows to score
        self.scores: list[np.ndarray] = []  # when H owns the scores: of self.outside, in order
        self._run: tuple[str, str] | None = None
        self.stopped = False
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # network per validated epoch

    def _snapshot(self, epoch: int, folder: Path | None) -> dict[str, torch.Tensor]:
        """The network of validated ``epoch`` (kept in memory, or on disk across a restart)."""
        if epoch in self.snapshots:
            return self.snapshots[epoch]
        if folder is not None and epoch in checkpoint.available_steps(folder / "validated"):
            state: dict[str, torch.Tensor] = checkpoint.load(folder / "validated", epoch).tree(
                "net"
            )
            return state
        raise ProtocolError(f"G asks for the network of epoch {epoch}, which was never validated")

    def stop(self) -> None:
        """End the run: a waiting receive raises :class:`RunAbortedError`."""
        self.stopped = True
        if self._run is not None:
            self.channel.abort_run(*self._run)

    def run(self, start: Envelope) -> nn.Module:
        """Follow G's run from its ``START``; returns the trained ``Net^B``."""
        body = control_of(start)
        job = FtlJob.from_json(body["job"])
        if job.job_id != start.job_id:
            raise ProtocolError(
                "START names another job than its envelope",
                public="START names another job than its envelope",
            )
        try:
            run = int(body.get("run", 0))
        except (TypeError, ValueError):
            raise ProtocolError("START holds no valid run number") from None
        cfg = job.config
        self._run = (start.job_id, start.run_id)
        folder = None if self.state_dir is None else ftl_folder(self.state_dir, job.job_id)
        held = [] if folder is None else checkpoint.available_steps(folder)
        peer = _Peer(
            channel=self.channel, job_id=start.job_id, run_id=start.run_id, timeout=self.timeout
        )
        key = fetch_key(peer, self.arbiter, allow_test_key=self.allow_test_key)
        peer.send(
            self.guest,
            FtlTag.ACCEPT,
            0,
            ControlBlock.from_obj({"ok": True, "outside": int(len(self.outside)), "held": held}),
        )
        spec = FtlSpec(
            job_id=job.job_id,
            key_id=key.key_id.hex(),
            key_bits=key.bits,
            batch=cfg.batch,
            d=cfg.d,
            guest=self.guest.party_id,
            host=self.channel.me.party_id,
            score_owner=job.score_owner,
            schedule=ftl_schedule(job, overlap=len(self.overlap), outside=len(self.outside)),
        )
        register(peer, self.arbiter, spec)
        open_run(peer, self.arbiter, run)
        cipher = PaillierCipher(key)
        pool = self._pool or ObfuscatorPool(key, executor=self.executor)
        md = MaskedDecryptionClient(
            channel=self.channel, arbiter=self.arbiter, cipher=cipher, timeout=self.timeout
        )
        torch.manual_seed(self.seed % 2**31)
        net = representation_net(self.x.shape[1], job.host_widths, cfg.d)
        optimizer = torch.optim.Adam(
            net.parameters(), lr=job.host_lr, weight_decay=job.weight_decay
        )
        x_all = torch.from_numpy(self.x)
        filt_tags = {t.value for t in (FtlTag.PHI, FtlTag.BATCH, FtlTag.SCORE_REQ, FtlTag.DONE)}
        from protocols.transport.base import MessageFilter

        enc_phi: EncryptedTensor | None = None
        first_phi = True
        while True:
            envelope = self.channel.recv_any(
                MessageFilter(
                    job_id=job.job_id,
                    run_id=start.run_id,
                    sender=self.guest.party_id,
                    tags=frozenset(filt_tags),
                ),
                timeout=self.timeout,
            )
            tag, t = envelope.tag, envelope.step
            if tag == FtlTag.DONE.value:
                return net
            if tag == FtlTag.PHI.value:
                if not isinstance(envelope.body, CipherBlock):
                    raise ProtocolError("PHI must carry ciphertexts")
                enc_phi = EncryptedTensor.from_block(
                    envelope.body, cipher=cipher, key_id=key.key_id
                )
                if folder is not None and first_phi and t > 0:  # R6: G resumes at epoch t
                    saved = checkpoint.load(folder, t)
                    net.load_state_dict(saved.tree("net"))
                    optimizer.load_state_dict(saved.tree("optimizer"))
                elif folder is not None and t > 0:  # R6: the state at the start of epoch t
                    checkpoint.save(
                        folder,
                        t,
                        trees={"net": net.state_dict(), "optimizer": optimizer.state_dict()},
                        big_ints={},
                        meta={},
                    )
                    checkpoint.prune(folder, keep=[t - 1, t])
                first_phi = False
                continue
            if enc_phi is None:
                raise ProtocolError(f"{tag} before PHI")
            if tag == FtlTag.SCORE_REQ.value:
                request = control_of(envelope)
                rows = np.asarray(request["rows"], dtype=np.int64)
                model_epoch = int(request["epoch"])
                if len(rows) and np.all(rows < 0):  # validation: keep this epoch's network
                    state = {k: v.clone() for k, v in net.state_dict().items()}
                    self.snapshots[model_epoch] = state
                    if folder is not None:
                        checkpoint.save(
                            folder / "validated",
                            model_epoch,
                            trees={"net": state},
                            big_ints={},
                            meta={},
                        )
                else:  # scoring: the network of the epoch G kept
                    net.load_state_dict(self._snapshot(model_epoch, folder))
                self._score(peer, md, cipher, pool, net, rows, t, job)
                continue
            pairs = np.asarray(control_of(envelope)["pairs"], dtype=np.int64)  # BATCH t
            if len(pairs) != cfg.batch or len(np.unique(pairs)) != len(pairs):
                raise ProtocolError(f"BATCH {t} must hold {cfg.batch} distinct pairs")
            rows = self.overlap[pairs]
            net.train()
            u_b = net(x_all[rows])
            u_np = u_b.detach().double().numpy()
            enc_u, enc_q = host_t1(u_np, enc_phi, cipher=cipher, pool=pool, executor=self.executor)
            peer.send(self.guest, FtlTag.T1, 2 * t, enc_u.to_block())
            peer.send(self.guest, FtlTag.T1, 2 * t + 1, enc_q.to_block())
            if cfg.gamma > 0:  # §6.4, only with reveal_overlap_repr
                peer.send(self.guest, FtlTag.UB, t, ControlBlock.from_obj({"u": u_np.tolist()}))
            enc_g = peer.cipher_tensor(self.guest, FtlTag.GB, t, cipher)
            residues = md.decrypt(
                enc_g, job_id=job.job_id, tag=FtlDecTag.GB, step=t, run_id=start.run_id
            )
            grad = decode_g_b(residues, n=key.n, config=cfg)  # T3
            optimizer.zero_grad()
            u_b.backward(torch.from_numpy(grad).to(u_b.dtype))
            optimizer.step()

    def _score(
        self,
        peer: _Peer,
        md: MaskedDecryptionClient,
        cipher: PaillierCipher,
        pool: ObfuscatorPool,
        net: nn.Module,
        rows: np.ndarray,
        step: int,
        job: FtlJob,
    ) -> None:
        """R4 at H: ``[[û_j]]`` of the requested rows (never plaintext)."""
        from protocols.crypto.fixedpoint import decode, ring
        from protocols.crypto.tensor import encrypt

        rows = np.asarray(rows, dtype=np.int64)
        # negative: overlap pair −1−p (validation); else a position in self.outside
        if rows.min(initial=0) < -len(self.overlap) or rows.max(initial=0) >= len(self.outside):
            raise ProtocolError("SCORE_REQ names rows this party does not hold")
        own = np.where(
            rows < 0,
            self.overlap[np.clip(-1 - rows, 0, None)],
            self.outside[np.clip(rows, 0, max(len(self.outside) - 1, 0))]
            if len(self.outside)
            else 0,
        )
        net.eval()
        with torch.no_grad():
            u = net(torch.from_numpy(self.x[own])).double().numpy()
        enc = encrypt(cipher, ring(encode_u(u), cipher.key.n), pool=pool, scale=F_A)
        peer.send(self.guest, FtlTag.SCORE_U, step, enc.to_block())
        if job.score_owner is ScoreOwner.HOST and not np.all(rows < 0):  # not validation
            if np.any(rows < 0):
                raise ProtocolError("a scoring request mixes overlap pairs and other rows")
            enc_s = peer.cipher_tensor(self.guest, FtlTag.SCORE_S, step, cipher)
            residues = md.decrypt(
                enc_s, job_id=job.job_id, tag=FtlDecTag.SCORE, step=step, run_id=peer.run_id
            )
            self.scores.append(decode(residues, cipher.key.n, scale=2 * F_A, bound=1e6).reshape(-1))
