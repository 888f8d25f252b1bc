"""The interactive layer's host part over a Channel: joint initialisation and one step.

Roles and keys: the arbiter A holds the Paillier key; the guest G and the host H hold the
public key and their own obfuscator pools. G keeps its share ``W^G`` in plaintext and H's
share as ``[[E]]``; H keeps ``E`` in plaintext and G's share as ``[[W^G]]``. Nobody holds
``W_h``. What each learns is docs/protocol.md §4.6: G learns ``z_h``, H learns ``g_h``, A only
uniform values.

Steps (§4.3, §4.4; P1 layouts of §4.8 — ``[[W^G]]``, ``[[D̂]]``, ``[[V̂]]`` row-packed,
``[[E]]`` column-packed):

I1. H → G ``INIT_M``: ``M_init = enc(W_0^H) − E_0`` (mod n in P0).
I2. G → H ``INIT_WG``: ``[[W^G_0]]`` with ``W^G_0 = enc(W_0^G) + M_init``.
I3. H → G ``INIT_E``: ``[[E_0]]``.
S1. G → H ``BATCH``: the step's row indices.
S2. H → G ``F1``: ``[[Ẑ]] = Obf(â ⊙ [[W^G]] ⊕ â·E)``; G decrypts it masked (``Z_FWD``).
S3. G → H ``B1``: ``[[Ĝ]] = Obf(δ̂ ⊙ [[E]] ⊕ δ̂·W^Gᵀ)`` from the pre-update shares; H decrypts
    it masked (``G_BWD``).
S4. G → H ``B2_1``: ``[[D̂]]``, fresh encryptions of ``enc_{f_d}(η_W·δ̃)``.
S5. H → G ``B2_2``: ``[[V̂]] = Obf(âᵀ ⊙ [[D̂]] ⊕ (E' − E))`` and ``B2_3``: ``[[E']]``; H sets
    ``[[W^G]] ← [[W^G]] ⊖ [[V̂]]``, ``E ← E'``.
S6. G decrypts ``V̂`` masked (``V_WUPD``; a raw residue in P0), sets ``W^G ← W^G − V̂``,
    ``[[E]] ← [[E']]`` and sends ``STEP_ACK``.

Evaluation (§4.4.1, no state change): G → H ``EVAL_BATCH{v, I_v}``; H → G ``EVAL_F1``
(``[[Ẑ]]`` as in S2); G decrypts it masked under ``Z_EVAL`` with its own step counter ``v``.

Every message carries the run id of the current (re)start, so a resumed run never collides
with what an interrupted one sent (§4.4.1).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.masked import PendingDecryption
from protocols.crypto.cipher import Cipher
from protocols.crypto.fixedpoint import FixedPointConfig, decode, encode, lift, ring
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.packing import pack_rows, unpack_rows
from protocols.crypto.tensor import EncryptedTensor, encrypt, plain_matmul
from protocols.envelope import (
    CipherBlock,
    ControlBlock,
    Envelope,
    IndexBlock,
    Packing,
    PlainBlock,
)
from protocols.errors import ConfigError, ProtocolError
from protocols.executor import Executor
from protocols.link import JobLink
from protocols.roles import Party
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode

SIGMA_STAT = 64
BIG_L = 64 + SIGMA_STAT - 1


class SplitTag(StrEnum):
    """Message tags of the split-NN interactive layer."""

    INIT_M = "splitnn.INIT_M"
    INIT_WG = "splitnn.INIT_WG"
    INIT_E = "splitnn.INIT_E"
    BATCH = "splitnn.BATCH"
    EVAL_BATCH = "splitnn.EVAL_BATCH"
    EVAL_F1 = "splitnn.EVAL_F1"
    F1 = "splitnn.F1"
    B1 = "splitnn.B1"
    B2_1 = "splitnn.B2_1"
    B2_2 = "splitnn.B2_2"
    B2_3 = "splitnn.B2_3"
    STEP_ACK = "splitnn.STEP_ACK"


@dataclass
class _Party:
    """What both sides share: the run's link, peer, spec, cipher, pool, executor and the
    arbiter's client (masked decryptions)."""

    link: JobLink
    peer: Party
    arbiter: Party
    spec: JobSpec
    cipher: Cipher
    pool: ObfuscatorPool
    executor: Executor
    fp: FixedPointConfig

    def __post_init__(self) -> None:
        self.link = replace(self.link, key_id=self.cipher.key.key_id)  # on every message
        self.n = self.cipher.key.n
        self.p1 = self.spec.mode is SplitMode.P1
        self.packing = (
            Packing(slot_bits=self.spec.slot_bits, slots=self.spec.slots, axis=1)
            if self.p1
            else None
        )
        self.md = ArbiterClient(link=self.link, arbiter=self.arbiter)

    def recv_tensor(self, tag: SplitTag, step: int) -> EncryptedTensor:
        env = self.link.recv(self.peer, tag, step)
        if not isinstance(env.body, CipherBlock):
            raise ProtocolError(f"{tag} step {step} carries no ciphertexts")
        return EncryptedTensor.from_block(env.body, cipher=self.cipher, key_id=env.key_id)

    def fresh_share(self, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            out[idx] = (
                secrets.randbelow(1 << BIG_L) - (1 << (BIG_L - 1))
                if self.p1
                else secrets.randbelow(int(self.n))
            )
        return out

    def _tensor(self, values: np.ndarray, scale: int) -> EncryptedTensor:
        return EncryptedTensor(values=values, cipher=self.cipher, scale=scale, packing=self.packing)

    def reduce(self, values: np.ndarray) -> np.ndarray:
        return values if self.p1 else ring(values, self.n)

    def rows(self, values: np.ndarray) -> np.ndarray:
        """Row-packed (P1) or as is (P0)."""
        return (
            pack_rows(values, slot_bits=self.spec.slot_bits, slots=self.spec.slots)
            if self.p1
            else values
        )

    def encrypt(self, values: np.ndarray, scale: int) -> EncryptedTensor:
        return encrypt(
            self.cipher,
            self.reduce(self.rows(values)),
            pool=self.pool,
            scale=scale,
            packing=self.packing,
        )

    def reveal(
        self,
        tensor: EncryptedTensor,
        tag: DecTag,
        step: int,
        *,
        width: int,
        scale: int,
        bound: float,
    ) -> np.ndarray:
        """Masked decryption, then decode (P0) or unpack every slot (P1)."""
        pending = self.md.request(tensor, tag=tag, step=step)
        return self.finish_reveal(pending, width=width, scale=scale, bound=bound)

    def finish_reveal(
        self, pending: PendingDecryption, *, width: int, scale: int, bound: float
    ) -> np.ndarray:
        """Collect a masked decryption sent earlier, then decode or unpack it."""
        residues = self.md.collect(pending)
        if self.p1:
            ints = unpack_rows(
                residues, self.n, slot_bits=self.spec.slot_bits, slots=self.spec.slots, width=width
            )
            return decode(ring(ints, self.n), self.n, scale=scale, bound=bound)
        return decode(residues, self.n, scale=scale, bound=bound)


class GuestLayer(_Party):
    """G's side: holds ``W^G`` and ``[[E]]``."""

    wg: np.ndarray
    enc_e: EncryptedTensor

    def init(self, w0_guest: np.ndarray) -> None:
        """I1-I3 at the guest."""
        env = self.link.recv(self.peer, SplitTag.INIT_M, 0)
        if not isinstance(env.body, PlainBlock):
            raise ProtocolError("INIT_M carries no plaintext block")
        m_init = np.array(self.cipher.key.residues_from_bytes(env.body.data), dtype=object).reshape(
            env.body.shape
        )
        if self.p1:
            m_init = lift(m_init, self.n, int_bound=1 << (BIG_L + 1))
        self.wg = self.reduce(encode(w0_guest, scale=self.fp.f_w, bound=self.fp.w_max) + m_init)
        self.link.send(
            self.peer,
            SplitTag.INIT_WG,
            0,
            self.encrypt(self.wg, self.fp.f_w).obfuscate(self.pool).to_block(),
        )
        self.enc_e = self.recv_tensor(SplitTag.INIT_E, 0)

    def step(
        self, step: int, rows: np.ndarray, delta_fn: Callable[[np.ndarray], np.ndarray], eta: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """S1-S6; ``delta_fn(z_h) -> δ̃`` is the guest's forward/backward on top."""
        if not 0 < eta <= 1:
            raise ConfigError(f"eta_w = {eta}: the shared weights need 0 < eta_w <= 1 (§2.2)")
        fp, k, d = self.fp, self.spec.k, self.spec.d
        self.link.send(self.peer, SplitTag.BATCH, step, IndexBlock.from_indices(rows))  # S1
        z = self.reveal(
            self.recv_tensor(SplitTag.F1, step),
            DecTag.Z_FWD,
            step,
            width=k,
            scale=fp.f_z,
            bound=fp.z_bound(d),
        )  # S2
        delta = delta_fn(z)
        d_hat = encode(delta, scale=fp.f_d, bound=fp.delta_max)
        addend = self.reduce(self.rows(d_hat.dot(self.wg.T)))
        g = plain_matmul(d_hat, self.enc_e, executor=self.executor, scale=fp.f_g).add_plain(addend)
        self.link.send(self.peer, SplitTag.B1, step, g.obfuscate(self.pool).to_block())  # S3
        big_d = encode(eta * delta, scale=fp.f_d, bound=fp.delta_max)
        self.link.send(self.peer, SplitTag.B2_1, step, self.encrypt(big_d, fp.f_d).to_block())  # S4
        enc_v = self.recv_tensor(SplitTag.B2_2, step)
        enc_e_new = self.recv_tensor(SplitTag.B2_3, step)
        residues = self.md.decrypt(enc_v, tag=DecTag.V_WUPD, step=step)  # S6
        if self.p1:
            bound = (1 << BIG_L) + self.spec.batch * (1 << (28 + 36))
            v = unpack_rows(
                residues, self.n, slot_bits=self.spec.slot_bits, slots=self.spec.slots, width=k
            )
            if any(abs(int(x)) >= bound for x in v.reshape(-1)):
                raise ProtocolError("V_WUPD slot out of range: overflow or broken invariant")
            self.wg = self.wg - v
        else:
            self.wg = ring(
                self.wg - residues, self.n
            )  # a raw residue: never lifted or range-checked
        self.enc_e = enc_e_new
        return z, delta

    def ack(self, step: int) -> None:
        """S6, last message: G is done with ``step`` (sent after its checkpoint, §4.4.1)."""
        self.link.send(self.peer, SplitTag.STEP_ACK, step, ControlBlock.from_obj({"step": step}))

    def evaluate(self, eval_step: int, rows: np.ndarray) -> np.ndarray:
        """``z_h`` of ``rows`` (exactly ``batch_eval`` of them) without changing any state."""
        self.link.send(self.peer, SplitTag.EVAL_BATCH, eval_step, IndexBlock.from_indices(rows))
        return self.reveal(
            self.recv_tensor(SplitTag.EVAL_F1, eval_step),
            DecTag.Z_EVAL,
            eval_step,
            width=self.spec.k,
            scale=self.fp.f_z,
            bound=self.fp.z_bound(self.spec.d),
        )

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint must keep of the interactive layer (§4.4.1)."""
        return {"wg": self.wg, "enc_e": self.enc_e.values}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state` of a checkpoint."""
        self.wg = state["wg"]
        self.enc_e = self._tensor(state["enc_e"], self.fp.f_w)


class HostLayer(_Party):
    """H's side: holds ``E`` and ``[[W^G]]``."""

    e: np.ndarray
    enc_wg: EncryptedTensor

    def cols(self, values: np.ndarray) -> np.ndarray:
        """Column-packed for G (P1: rows of the transpose), as is in P0."""
        return (
            pack_rows(values.T.copy(), slot_bits=self.spec.slot_bits, slots=self.spec.slots)
            if self.p1
            else values.T.copy()
        )

    def init(self, w0_host: np.ndarray) -> None:
        """I1-I3 at the host."""
        self.e = self.fresh_share(w0_host.shape)
        m_init = ring(encode(w0_host, scale=self.fp.f_w, bound=self.fp.w_max) - self.e, self.n)
        self.link.send(
            self.peer,
            SplitTag.INIT_M,
            0,
            PlainBlock(self.cipher.key.residues_to_bytes(m_init.reshape(-1)), shape=m_init.shape),
        )
        self.enc_wg = self.recv_tensor(SplitTag.INIT_WG, 0)
        self.link.send(self.peer, SplitTag.INIT_E, 0, self._encrypt_cols(self.e).to_block())

    def _encrypt_cols(self, values: np.ndarray) -> EncryptedTensor:
        return encrypt(
            self.cipher,
            self.reduce(self.cols(values)),
            pool=self.pool,
            scale=self.fp.f_w,
            packing=self.packing,
        )

    def rows_of(self, envelope: Envelope, count: int) -> np.ndarray:
        """The row indices of a ``BATCH``/``EVAL_BATCH`` (exactly ``count`` of them)."""
        if not isinstance(envelope.body, IndexBlock):
            raise ProtocolError(f"{envelope.tag} carries no row indices")
        rows = envelope.body.indices()
        if rows.shape != (count,):
            raise ProtocolError(
                f"{envelope.tag} step {envelope.step}: {rows.size} rows, not {count}"
            )
        return rows

    def forward(self, alpha: np.ndarray) -> tuple[np.ndarray, EncryptedTensor]:
        """``â`` and ``[[Ẑ]] = Obf(â ⊙ [[W^G]] ⊕ â·E)`` (S2)."""
        fp = self.fp
        a_hat = encode(alpha, scale=fp.f_a, bound=fp.a_max)
        z = plain_matmul(a_hat, self.enc_wg, executor=self.executor, scale=fp.f_z)
        return a_hat, z.add_plain(self.reduce(self.rows(a_hat.dot(self.e)))).obfuscate(self.pool)

    def evaluate(self, eval_step: int, alpha: np.ndarray) -> None:
        """Answer ``EVAL_BATCH{eval_step}``: ``EVAL_F1`` for the rows' ``α``, no state change."""
        self.link.send(self.peer, SplitTag.EVAL_F1, eval_step, self.forward(alpha)[1].to_block())

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint must keep of the interactive layer (§4.4.1)."""
        return {"e": self.e, "enc_wg": self.enc_wg.values}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state` of a checkpoint."""
        self.e = state["e"]
        self.enc_wg = EncryptedTensor(
            values=state["enc_wg"], cipher=self.cipher, scale=self.fp.f_w, packing=self.packing
        )

    def step(
        self, step: int, rows: np.ndarray, alpha_fn: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """S2-S5 at the host for the ``rows`` of ``BATCH{step}``; ``alpha_fn(rows) -> α``."""
        fp, d = self.fp, self.spec.d
        alpha = alpha_fn(rows)
        a_hat, z = self.forward(alpha)
        self.link.send(self.peer, SplitTag.F1, step, z.to_block())  # S2
        pending = self.md.request(
            self.recv_tensor(SplitTag.B1, step), tag=DecTag.G_BWD, step=step
        )  # S3: A decrypts while H runs B2 (§4.4.1 order: B2-2, B2-3 before B1-3)
        enc_d = self.recv_tensor(SplitTag.B2_1, step)  # S4
        e_new = self.fresh_share(self.e.shape)
        v = plain_matmul(a_hat.T.copy(), enc_d, executor=self.executor, scale=fp.f_w)
        v = v.add_plain(self.reduce(self.rows(e_new - self.e))).obfuscate(self.pool)
        self.link.send(self.peer, SplitTag.B2_2, step, v.to_block())  # S5
        self.link.send(self.peer, SplitTag.B2_3, step, self._encrypt_cols(e_new).to_block())
        self.enc_wg = self.enc_wg.sub(v)
        self.e = e_new
        g = self.finish_reveal(pending, width=d, scale=fp.f_g, bound=fp.g_bound(self.spec.k))
        return alpha, g

    def wait_ack(self, step: int) -> None:
        """S6 at the host: G is done with ``step``."""
        self.link.recv(self.peer, SplitTag.STEP_ACK, step)
