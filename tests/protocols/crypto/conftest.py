"""One process executor and obfuscator pool for the whole session (the key: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PublicKey
from protocols.executor import LocalProcessExecutor


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
