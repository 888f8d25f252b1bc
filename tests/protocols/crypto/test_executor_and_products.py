"""The process executor (ordering, retry after a killed worker) and the F1/B1/B2 products."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from protocols.crypto.cipher import PaillierCipher, PlaintextCipher
from protocols.crypto.fixedpoint import lift, ring
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.packing import capacity, pack_rows, unpack_rows
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.tensor import EncryptedTensor, encrypt, plain_matmul
from protocols.envelope import Packing
from protocols.executor import ExecutorError, InlineExecutor, LocalProcessExecutor, split


def square(x: int) -> int:
    return x * x


def die_once(args: tuple[str, int]) -> int:
    """Kills its worker the first time it sees a chunk (a marker file remembers)."""
    marker, value = args
    path = Path(f"{marker}-{value}")
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return value * 10


def always_die(_: int) -> int:
    os._exit(1)


def test_split_covers_everything() -> None:
    assert [len(r) for r in split(10, 3)] == [4, 3, 3]
    assert split(2, 8) == [range(0, 1), range(1, 2)]


def test_results_come_back_in_chunk_order(executor: LocalProcessExecutor) -> None:
    assert executor.map(square, list(range(20))) == [x * x for x in range(20)]


def test_a_killed_worker_is_retried(tmp_path: Path) -> None:
    with LocalProcessExecutor(workers=2) as ex:
        assert ex.map(die_once, [(str(tmp_path / "m"), v) for v in range(4)]) == [0, 10, 20, 30]
    with (
        LocalProcessExecutor(workers=1, retries=1) as ex,
        pytest.raises(ExecutorError, match="died"),
    ):
        ex.map(always_die, [1])


def ints(rng: random.Random, shape: tuple[int, int], bits: int) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(shape):
        out[idx] = rng.randint(-(2**bits) + 1, 2**bits - 1)
    return out


def decrypt(sk: PrivateKey, t: EncryptedTensor) -> np.ndarray:
    return np.vectorize(sk.decrypt, otypes=[object])(t.values)


@pytest.mark.parametrize("rows", [6, 60])  # few rows: multi-exponentiation; many: fixed-base tables
def test_plain_matmul_matches_integer_product(
    rows: int,
    pk: PublicKey,
    sk: PrivateKey,
    cipher: PaillierCipher,
    pool: ObfuscatorPool,
    executor: LocalProcessExecutor,
) -> None:
    rng = random.Random(rows)
    w = ints(rng, (5, 3), 60)
    a = ints(rng, (rows, 5), 27)
    enc = encrypt(cipher, w, pool=pool, scale=56)
    out = plain_matmul(a, enc, executor=executor, scale=80)
    assert (lift(decrypt(sk, out), pk.n) == a.dot(w)).all()


def test_p1_products_in_the_three_orientations(
    pk: PublicKey,
    sk: PrivateKey,
    cipher: PaillierCipher,
    pool: ObfuscatorPool,
    executor: LocalProcessExecutor,
) -> None:
    """§4.8 layouts with extreme inputs: the revealed slots are exactly â·W, δ̂·Wᵀ, âᵀD̂ + E' − E."""
    s, batch, d, k = 130, 8, 4, 9
    slots = capacity(pk.bits, s)  # 7 at 1024 bits, so k = 9 needs two blocks
    rng = random.Random(7)
    big_l = 127
    a_hat = ints(rng, (batch, d), 27)
    d_hat = ints(rng, (batch, k), 35)
    w_enc = ints(rng, (d, k), 63)  # enc(W)
    e = ints(rng, (d, k), big_l - 1)  # H's share
    e_new = ints(rng, (d, k), big_l - 1)
    wg = w_enc - e  # G's share, over the integers (P1)
    packing = Packing(slot_bits=s, slots=slots, axis=1)

    # F1 at H: [[Ẑ]] = â ⊙ [[W^G]] (row-packed) ⊕ pack(â·E), then Obf
    cw = encrypt(
        cipher, pack_rows(wg, slot_bits=s, slots=slots), pool=pool, scale=56, packing=packing
    )
    z = plain_matmul(a_hat, cw, executor=executor, scale=80)
    z = z.add_plain(pack_rows(a_hat.dot(e), slot_bits=s, slots=slots)).obfuscate(pool)
    assert z.obfuscated
    got = unpack_rows(decrypt(sk, z), pk.n, slot_bits=s, slots=slots, width=k)
    assert (got == a_hat.dot(w_enc)).all()

    # B1 at G: [[Ĝ]] = δ̂ ⊙ [[E]] (column-packed: rows of Eᵀ) ⊕ pack(δ̂·W^Gᵀ)
    ce = encrypt(
        cipher,
        pack_rows(e.T.copy(), slot_bits=s, slots=slots),
        pool=pool,
        scale=56,
        packing=packing,
    )
    g = plain_matmul(d_hat, ce, executor=executor, scale=88)
    g = g.add_plain(pack_rows(d_hat.dot(wg.T), slot_bits=s, slots=slots)).obfuscate(pool)
    got = unpack_rows(decrypt(sk, g), pk.n, slot_bits=s, slots=slots, width=d)
    assert (got == d_hat.dot(w_enc.T)).all()

    # B2 at H: [[V̂]] = âᵀ ⊙ [[D̂]] (row-packed) ⊕ pack(E' − E)
    cd = encrypt(
        cipher, pack_rows(d_hat, slot_bits=s, slots=slots), pool=pool, scale=32, packing=packing
    )
    v = plain_matmul(a_hat.T.copy(), cd, executor=executor, scale=56)
    v = v.add_plain(pack_rows(e_new - e, slot_bits=s, slots=slots)).obfuscate(pool)
    got = unpack_rows(decrypt(sk, v), pk.n, slot_bits=s, slots=slots, width=k)
    assert (got == a_hat.T.dot(d_hat) + e_new - e).all()

    # H's local share update keeps the invariant: [[W^G]] ⊖ [[V̂]] = W^G - V̂
    cw_next = cw.sub(v)
    got = unpack_rows(decrypt(sk, cw_next), pk.n, slot_bits=s, slots=slots, width=k)
    assert (got == wg - (a_hat.T.dot(d_hat) + e_new - e)).all()


def test_plaintext_cipher_gives_the_same_product(
    pk: PublicKey, sk: PrivateKey, pool: ObfuscatorPool
) -> None:
    plain = PlaintextCipher(pk, i_understand_nothing_is_encrypted=True)
    rng = random.Random(3)
    w, a = ints(rng, (4, 2), 40), ints(rng, (3, 4), 20)
    pt = plain_matmul(a, encrypt(plain, w, pool=pool, scale=0), executor=InlineExecutor(), scale=0)
    assert (lift(pt.values, pk.n) == a.dot(w)).all()
    block = pt.to_block()
    again = EncryptedTensor.from_block(block, cipher=plain, key_id=pk.key_id)
    assert (again.values == pt.values).all()
    assert (ring(a.dot(w), pk.n) == pt.values).all()
