"""The guest G of an FTL job (labelled source domain): R1-R6 of :mod:`vfl.transfer.session`."""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocols.arbiter.client import ArbiterClient
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.tensor import EncryptedTensor, plain_matmul
from protocols.errors import ConfigError, JobRefusedError, ProtocolError
from protocols.executor import Executor
from protocols.files import atomic_write
from protocols.link import JobLink
from protocols.roles import Party
from vfl.common import checkpoint
from vfl.common.metrics import binary_metrics
from vfl.transfer.ftl import (
    F_A,
    decode_k,
    decode_loss,
    encode_u,
    encrypt_phi,
    guest_batch,
    protect_noise,
    representation_net,
    to_signs,
)
from vfl.transfer.session import (
    SCORE_CHUNK,
    SCORE_OFFSET,
    FtlDecTag,
    FtlJob,
    FtlResult,
    FtlSpec,
    FtlTag,
    ScoreOwner,
    cipher_tensor,
    claim_steps,
    ftl_folder,
    ftl_schedule,
    standardise,
)

logger = logging.getLogger(__name__)


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
        peer = JobLink(
            channel=self.channel, job_id=job.job_id, run_id=self.run_id, timeout=self.timeout
        )
        arbiter = ArbiterClient(link=peer, arbiter=self.arbiter, allow_test_key=self.allow_test_key)
        key = arbiter.public_key()  # R1
        self.key_id = key.key_id.hex()
        held = [] if self.folder is None else checkpoint.available_steps(self.folder)
        base = 0 if self.folder is None else claim_steps(self.folder)  # R6
        start = {
            "job": job.to_json(),
            "request": self.host_request,
            "held": held,
            "run": base >> 32,
        }
        peer.send(self.host, FtlTag.START, 0, start)
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
        arbiter.register(spec.to_json())
        arbiter.open_run(base >> 32)  # R6
        cipher = PaillierCipher(key)
        pool = self._pool or ObfuscatorPool(key, executor=self.executor)
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
                peer.send(self.host, FtlTag.BATCH, t, {"pairs": batch.tolist()})
                rows = self.overlap[batch]
                enc_u = cipher_tensor(peer, self.host, FtlTag.T1, 2 * t, cipher)
                enc_q = cipher_tensor(peer, self.host, FtlTag.T1, 2 * t + 1, cipher)
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
                k_req = arbiter.request(out.four_k, tag=FtlDecTag.K, step=t)
                l_req = arbiter.request(out.lam, tag=FtlDecTag.LOSS, step=t)
                k = decode_k(arbiter.collect(k_req), n=key.n)
                loss = decode_loss(arbiter.collect(l_req), n=key.n, rows=len(batch), config=cfg)
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
                    arbiter,
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
                peer, arbiter, cipher, pool, phi, np.arange(outside), score_step, best_epoch
            )
        peer.send(self.host, FtlTag.DONE, 0, {"best_epoch": best_epoch})
        return FtlResult(
            job_id=job.job_id,
            epochs=len(history),
            best_epoch=best_epoch,
            history=tuple(history),
            scores=final_scores,
            validation=(list(best_val[0]), list(best_val[1])),
            seconds=time.monotonic() - started,
            phi=tuple(float(v) for v in phi),
        )

    def overlap_host_rows(self, pairs: np.ndarray) -> np.ndarray:
        """Pair positions for H's scoring request (H maps them to its rows)."""
        return -1 - np.asarray(pairs, dtype=np.int64)  # negative: overlap pair positions

    def _score(
        self,
        peer: JobLink,
        arbiter: ArbiterClient,
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
            peer.send(self.host, FtlTag.SCORE_REQ, step, {"rows": chunk.tolist(), "epoch": epoch})
            enc_u = cipher_tensor(peer, self.host, FtlTag.SCORE_U, step, cipher)
            enc_u_t = EncryptedTensor(cipher=cipher, values=enc_u.values.T.copy(), scale=F_A)
            s = plain_matmul(phi_hat, enc_u_t, executor=self.executor, scale=2 * F_A)
            s = s.obfuscate(pool)
            if self.job.score_owner is ScoreOwner.HOST and not validation:
                peer.send(self.host, FtlTag.SCORE_S, step, s.to_block())
            else:
                from protocols.crypto.fixedpoint import decode

                tag = FtlDecTag.VAL if validation else FtlDecTag.SCORE
                residues = arbiter.decrypt(s, tag=tag, step=step)
                out.append(decode(residues, cipher.key.n, scale=2 * F_A, bound=1e6).reshape(-1))
            step += 1
        return (np.concatenate(out) if out else None), step
