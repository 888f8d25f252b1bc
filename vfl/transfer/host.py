"""The host H of an FTL job (unlabelled target domain): R1-R6 of :mod:`vfl.transfer.session`."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protocols.arbiter.client import ArbiterClient
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, Envelope, control_of
from protocols.errors import ProtocolError
from protocols.executor import Executor
from protocols.link import JobLink
from protocols.roles import Party
from vfl.common import checkpoint
from vfl.transfer.ftl import (
    F_A,
    decode_g_b,
    encode_u,
    host_t1,
    representation_net,
)
from vfl.transfer.session import (
    FtlDecTag,
    FtlJob,
    FtlSpec,
    FtlTag,
    ScoreOwner,
    cipher_tensor,
    ftl_folder,
    ftl_schedule,
    standardise,
)

logger = logging.getLogger(__name__)


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
        peer = JobLink.answering(self.channel, start, timeout=self.timeout)
        arbiter = ArbiterClient(link=peer, arbiter=self.arbiter, allow_test_key=self.allow_test_key)
        key = arbiter.public_key()  # R1
        accept = {"ok": True, "outside": int(len(self.outside)), "held": held}
        peer.send(self.guest, FtlTag.ACCEPT, 0, accept)
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
        arbiter.register(spec.to_json())
        arbiter.open_run(run)  # R6
        cipher = PaillierCipher(key)
        pool = self._pool or ObfuscatorPool(key, executor=self.executor)
        torch.manual_seed(self.seed % 2**31)
        net = representation_net(self.x.shape[1], job.host_widths, cfg.d)
        optimizer = torch.optim.Adam(
            net.parameters(), lr=job.host_lr, weight_decay=job.weight_decay
        )
        x_all = torch.from_numpy(self.x)
        led_by = (FtlTag.PHI, FtlTag.BATCH, FtlTag.SCORE_REQ, FtlTag.DONE)
        enc_phi: EncryptedTensor | None = None
        first_phi = True
        while True:
            envelope = peer.recv_any(self.guest, led_by)
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
                self._score(peer, arbiter, cipher, pool, net, rows, t, job)
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
                peer.send(self.guest, FtlTag.UB, t, {"u": u_np.tolist()})
            enc_g = cipher_tensor(peer, self.guest, FtlTag.GB, t, cipher)
            residues = arbiter.decrypt(enc_g, tag=FtlDecTag.GB, step=t)
            grad = decode_g_b(residues, n=key.n, config=cfg)  # T3
            optimizer.zero_grad()
            u_b.backward(torch.from_numpy(grad).to(u_b.dtype))
            optimizer.step()

    def _score(
        self,
        peer: JobLink,
        arbiter: ArbiterClient,
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
            enc_s = cipher_tensor(peer, self.guest, FtlTag.SCORE_S, step, cipher)
            residues = arbiter.decrypt(enc_s, tag=FtlDecTag.SCORE, step=step)
            self.scores.append(decode(residues, cipher.key.n, scale=2 * F_A, bound=1e6).reshape(-1))
