"""A small test-only key and one process executor for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.executor import LocalProcessExecutor


@pytest.fixture(scope="session")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(bits=1024, allow_test_key=True)


@pytest.fixture(scope="session")
def pk(keypair: tuple[PublicKey, PrivateKey]) -> PublicKey:
    return keypair[0]


@pytest.fixture(scope="session")
def sk(keypair: tuple[PublicKey, PrivateKey]) -> PrivateKey:
    return keypair[1]


@pytest.fixture(scope="session")
def executor() -> Iterator[LocalProcessExecutor]:
    ex = LocalProcessExecutor(workers=2)
    yield ex
    ex.close()


@pytest.fixture(scope="session")
def pool(pk: PublicKey, executor: LocalProcessExecutor) -> Iterator[ObfuscatorPool]:
    p = ObfuscatorPool(pk, executor=executor)
    p.fill(400)
    yield p
    p.close()


@pytest.fixture(scope="session")
def cipher(pk: PublicKey) -> PaillierCipher:
    return PaillierCipher(pk)
