"""C2, C3, C7 and key handling (docs/protocol.md §8.1)."""

from __future__ import annotations

import numpy as np
import pytest
from gmpy2 import mpz

from protocols.crypto.cipher import PaillierCipher, PlaintextCipher
from protocols.crypto.fixedpoint import lift
from protocols.crypto.obfuscators import ObfuscatorKind, ObfuscatorPool, generate
from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.crypto.tensor import EncryptedTensor, encrypt
from protocols.errors import InsecureConfigError, InvalidCiphertextError, KeyMismatchError
from protocols.executor import InlineExecutor


def signed(sk: PrivateKey, c: mpz) -> int:
    return int(lift(np.array([sk.decrypt(c)], dtype=object), sk.public.n)[0])


def test_c2_homomorphic_operations(pk: PublicKey, sk: PrivateKey, pool: ObfuscatorPool) -> None:
    a, b = -123456789, 987654321
    ca, cb = pk.encrypt(a, pool.take(1)[0]), pk.encrypt(b, pool.take(1)[0])
    assert signed(sk, pk.add(ca, cb)) == a + b
    assert signed(sk, pk.sub(ca, cb)) == a - b
    assert signed(sk, pk.add_plain(ca, -5)) == a - 5
    for k in (0, 1, 7, -1, -(2**35) + 1):
        assert signed(sk, pk.mul_scalar(ca, k)) == a * k
    assert sk.decrypt(pk.encrypt(-1, pool.take(1)[0])) == pk.n - 1  # k ⊙ Enc(a) = k·a mod n


def test_c3_obfuscation_and_pool_audit(pk: PublicKey, sk: PrivateKey, executor) -> None:  # type: ignore[no-untyped-def]
    fresh = ObfuscatorPool(pk, executor=executor)
    fresh.fill(50)
    c = pk.mul_scalar(pk.encrypt(42, fresh.take(1)[0]), 3)
    o1, o2 = pk.obfuscate(c, fresh.take(1)[0]), pk.obfuscate(c, fresh.take(1)[0])
    assert sk.decrypt(o1) == sk.decrypt(o2) == 126
    assert len({c, o1, o2}) == 3  # the same evaluated value sent twice differs
    taken = fresh.take(47) + fresh.take(10)  # 10 more than were ready: generated online
    assert len(set(taken)) == len(taken) == 57 and fresh.handed_out == 60 and fresh.size == 0


@pytest.mark.parametrize(
    "kind", [ObfuscatorKind.FIXED_BASE, ObfuscatorKind.R_POW_N, ObfuscatorKind.SHORT_EXPONENT]
)
def test_every_generator_gives_valid_obfuscators(
    pk: PublicKey, sk: PrivateKey, kind: ObfuscatorKind
) -> None:
    rhos = generate(pk.n, pk.h_s, pk.bits, kind, 3)
    assert len(set(rhos)) == 3
    assert all(sk.decrypt(pk.encrypt(99, r)) == 99 for r in rhos)


def test_short_exponent_needs_its_flag(pk: PublicKey) -> None:
    with pytest.raises(InsecureConfigError, match="allow_short_exponent"):
        ObfuscatorPool(pk, executor=InlineExecutor(), kind=ObfuscatorKind.SHORT_EXPONENT)
    ObfuscatorPool(
        pk, executor=InlineExecutor(), kind=ObfuscatorKind.SHORT_EXPONENT, allow_short_exponent=True
    )


def test_background_filling(pk: PublicKey) -> None:
    p = ObfuscatorPool(pk, executor=InlineExecutor())
    p.keep_filled(20)
    try:
        import time

        deadline = time.monotonic() + 30
        while p.size < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.size >= 20
    finally:
        p.close()


def test_c7_ciphertext_validation(
    pk: PublicKey, cipher: PaillierCipher, pool: ObfuscatorPool
) -> None:
    good = encrypt(cipher, np.array([1, 2], dtype=object), pool=pool, scale=0)
    block = good.to_block()
    assert (
        EncryptedTensor.from_block(block, cipher=cipher, key_id=pk.key_id).values.tolist()
        == good.values.tolist()
    )
    w = pk.c_bytes
    for bad, needle in (
        (bytes(w) + block.data[w:], "out of range"),  # c = 0
        (int(pk.n2).to_bytes(w, "big") + block.data[w:], "out of range"),  # c = n^2
        (block.data[:-1], "expected"),  # wrong length
    ):
        with pytest.raises(InvalidCiphertextError, match=needle):
            EncryptedTensor.from_block(
                type(block)(data=bad, shape=(2,)), cipher=cipher, key_id=pk.key_id
            )
    with pytest.raises(KeyMismatchError):
        EncryptedTensor.from_block(block, cipher=cipher, key_id=b"\x00" * 16)


def test_key_mismatch_between_tensors(
    pk: PublicKey, cipher: PaillierCipher, pool: ObfuscatorPool
) -> None:
    other_pk, _ = generate_keypair(bits=512, allow_test_key=True)
    other = ObfuscatorPool(other_pk, executor=InlineExecutor())
    a = encrypt(cipher, np.array([1], dtype=object), pool=pool, scale=0)
    b = encrypt(PaillierCipher(other_pk), np.array([1], dtype=object), pool=other, scale=0)
    with pytest.raises(KeyMismatchError):
        _ = a + b


def test_key_size_floor() -> None:
    with pytest.raises(InsecureConfigError, match="insecure"):
        generate_keypair(bits=1024)
    with pytest.raises(InsecureConfigError):
        generate_keypair(bits=128, allow_test_key=True)


def test_public_key_serialisation(pk: PublicKey) -> None:
    obj = pk.to_json()
    assert PublicKey.from_json(obj, allow_test_key=True) == pk
    with pytest.raises(InsecureConfigError):
        PublicKey.from_json(obj)  # a 1024-bit key from a peer is refused without the test flag
    tampered = dict(obj, key_id="00" * 16)
    with pytest.raises(KeyMismatchError):
        PublicKey.from_json(tampered, allow_test_key=True)


def test_plaintext_cipher_needs_flag_and_matches(
    pk: PublicKey, sk: PrivateKey, pool: ObfuscatorPool
) -> None:
    with pytest.raises(InsecureConfigError):
        PlaintextCipher(pk)
    plain = PlaintextCipher(pk, i_understand_nothing_is_encrypted=True)
    real = PaillierCipher(pk)
    a, b = mpz(5), mpz(-9) % pk.n
    rho = pool.take(1)[0]
    assert plain.add(
        plain.encrypt(5, rho), plain.mul_scalar(plain.encrypt(-9, rho), -3)
    ) == sk.decrypt(
        real.add(
            real.encrypt(int(a), rho), real.mul_scalar(real.encrypt(int(b), pool.take(1)[0]), -3)
        )
    )
