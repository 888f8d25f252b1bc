"""The X25519 group: commutativity (P2), hash-to-curve membership, validation (P8)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import InvalidPointError
from psi import ecdh

PREFIX = ecdh.dst("generic") + bytes(16)


@settings(max_examples=50, deadline=None)
@given(
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
)
def test_p2_masking_commutes(c: bytes, a: bytes, b: bytes) -> None:
    ka, kb = X25519PrivateKey.from_private_bytes(a), X25519PrivateKey.from_private_bytes(b)
    u = ecdh.hash_to_curve(c, prefix=PREFIX)
    assert ecdh.mask(ka, ecdh.mask(kb, u)) == ecdh.mask(kb, ecdh.mask(ka, u))


def test_hashed_points_are_on_the_curve_and_canonical() -> None:
    points = [ecdh.hash_to_curve(f"id{i}".encode(), prefix=PREFIX) for i in range(300)]
    assert all(ecdh.on_curve(int.from_bytes(p, "little")) for p in points)
    ecdh.validate(b"".join(points), expected=300)
    raw = [bytearray(os.urandom(32)) for _ in range(300)]  # plain hashes: about half on the twist
    for r in raw:
        r[31] &= 0x7F
    twist = sum(not ecdh.on_curve(int.from_bytes(r, "little")) for r in raw)
    assert 100 < twist < 200


def test_domain_and_salt_separate() -> None:
    a = ecdh.hash_to_curve(b"x", prefix=ecdh.dst("generic") + bytes(16))
    assert a != ecdh.hash_to_curve(b"x", prefix=ecdh.dst("email") + bytes(16))
    assert a != ecdh.hash_to_curve(b"x", prefix=ecdh.dst("generic") + b"\x01" * 16)


GOOD = ecdh.dummy_points(3)


def good(n: int = 3) -> bytes:
    return GOOD[: 32 * n]


@pytest.mark.parametrize(
    "data, needle",
    [
        (good()[:-1], "whole number"),
        (good(2) + bytes(31) + b"\x80", "bit 255"),
        (good(2) + ((1 << 255) - 19).to_bytes(32, "little"), ">= p"),
        (good(2) + ((1 << 255) - 1).to_bytes(32, "little"), ">= p"),
        (good(2) + good(2)[:32], "duplicate"),
    ],
)
def test_p8_malformed_lists_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidPointError, match=needle):
        ecdh.validate(data)


def test_p8_size_and_small_order_points() -> None:
    with pytest.raises(InvalidPointError, match="expected 4"):
        ecdh.validate(good(3), expected=4)
    key = X25519PrivateKey.generate()
    with pytest.raises(InvalidPointError, match="small-order"):
        ecdh.mask(key, bytes(32))  # all-zero u: all-zero result
    assert ecdh.validate(((1 << 255) - 20).to_bytes(32, "little")).shape == (1,)  # p - 1 is fine
