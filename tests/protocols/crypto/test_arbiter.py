"""Masked decryption through the arbiter's service and its policy (§2.5, §2.6)."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gmpy2 import mpz

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.service import ArbiterService, _decrypt_chunk_from_file
from protocols.crypto.cipher import PaillierCipher, PlaintextCipher
from protocols.crypto.fixedpoint import lift
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair, key_file_bytes
from protocols.crypto.policy import (
    Admission,
    DecryptionPolicy,
    JobPolicy,
    PolicyRule,
    StepWindow,
)
from protocols.crypto.tensor import EncryptedTensor, encrypt
from protocols.envelope import Envelope
from protocols.errors import CryptoError, PolicyViolationError, ReplayConflictError
from protocols.executor import InlineExecutor, LocalProcessExecutor
from protocols.link import JobLink
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.inmemory import InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER


class DecTag(StrEnum):
    Z_FWD = "testsplit.Z_FWD"
    G_BWD = "testsplit.G_BWD"


WINDOW = StepWindow(stop=16)


def policy_for(job_id: str, pk: PublicKey, count: int = 6) -> JobPolicy:
    return JobPolicy(
        job_id=job_id,
        key_id=pk.key_id,
        rules=(
            PolicyRule(DecTag.Z_FWD.value, "bank", count, window=WINDOW, rewind=2),
            PolicyRule(DecTag.G_BWD.value, "retailer", count, window=WINDOW, rewind=2),
        ),
        parties=("bank", "retailer"),
        max_resumes=4,
    )


class Trio:
    def __init__(
        self, pk: PublicKey, sk: PrivateKey | None, cipher, executor, key_file=None
    ) -> None:  # type: ignore[no-untyped-def]
        net = InMemoryNetwork()
        self.ch: dict[str, Channel] = {
            p.party_id: net.channel(p, tags=TagRegistry([DecTag]))
            for p in (BANK, RETAILER, ARBITER)
        }
        self.policy = DecryptionPolicy()
        self.service = ArbiterService(
            channel=self.ch["arbiter"],
            cipher=cipher,
            private_key=sk,
            policy=self.policy,
            executor=executor,
            key_file=key_file,
        )
        self.service.serve(DecTag)
        self.cipher = cipher

    def client(self, party: str, job_id: str, run_id: str = "") -> ArbiterClient:
        link = JobLink(channel=self.ch[party], job_id=job_id, run_id=run_id, timeout=20)
        return ArbiterClient(link=link, arbiter=ARBITER)

    def close(self) -> None:
        for c in self.ch.values():
            c.close()


@pytest.fixture
def trio(
    pk: PublicKey, sk: PrivateKey, cipher: PaillierCipher, executor: LocalProcessExecutor
) -> Iterator[Trio]:
    t = Trio(pk, sk, cipher, executor)
    yield t
    t.close()


def tensor(cipher, pool, values: list[int]) -> EncryptedTensor:  # type: ignore[no-untyped-def]
    return encrypt(cipher, np.array(values, dtype=object).reshape(2, 3), pool=pool, scale=0)


def register(trio: Trio, policy: JobPolicy) -> None:
    assert trio.policy.propose(policy, submitter="bank") is False  # waits for the host's JOB_SPEC
    assert trio.policy.propose(policy, submitter="retailer") is True


def test_masked_decryption_round_trip(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str
) -> None:
    register(trio, policy_for(job_id, pk))
    values = [-5, 0, 7, 2**40, -(2**50), 123]
    got = trio.client("bank", job_id).decrypt(
        tensor(trio.cipher, pool, values), tag=DecTag.Z_FWD, step=0
    )
    assert lift(got, pk.n).reshape(-1).tolist() == values
    got = trio.client("retailer", job_id).decrypt(
        tensor(trio.cipher, pool, values), tag=DecTag.G_BWD, step=0
    )
    assert lift(got, pk.n).reshape(-1).tolist() == values
    assert trio.policy.counts(job_id) == {DecTag.Z_FWD.value: 6, DecTag.G_BWD.value: 6}


def test_wrong_requester_and_wrong_count_are_refused(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str
) -> None:
    register(trio, policy_for(job_id, pk, count=6))
    with pytest.raises(PolicyViolationError, match="may not request"):
        trio.client("retailer", job_id).decrypt(
            tensor(trio.cipher, pool, [1] * 6), tag=DecTag.Z_FWD, step=1
        )
    small = encrypt(trio.cipher, np.array([1, 2], dtype=object), pool=pool, scale=0)
    with pytest.raises(PolicyViolationError, match="2 values requested, policy allows 6"):
        trio.client("bank", job_id).decrypt(small, tag=DecTag.Z_FWD, step=2)
    with pytest.raises(PolicyViolationError, match="no registered decryption policy"):
        trio.client("bank", "unknown-job").decrypt(
            tensor(trio.cipher, pool, [1] * 6), tag=DecTag.Z_FWD, step=0
        )


def test_non_identical_repeat_is_refused(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str
) -> None:
    register(trio, policy_for(job_id, pk))
    client = trio.client("bank", job_id)
    client.decrypt(tensor(trio.cipher, pool, [1] * 6), tag=DecTag.Z_FWD, step=3)
    with pytest.raises(ReplayConflictError):  # same run: the transport refuses it already
        client.decrypt(tensor(trio.cipher, pool, [2] * 6), tag=DecTag.Z_FWD, step=3)
    with pytest.raises(
        PolicyViolationError, match="already served"
    ):  # another run: the policy does
        trio.client("bank", job_id, "r2").decrypt(
            tensor(trio.cipher, pool, [2] * 6), tag=DecTag.Z_FWD, step=3
        )
    trio.policy.resume(job_id, 3)  # RESUME re-opens the step
    got = trio.client("bank", job_id, "r3").decrypt(
        tensor(trio.cipher, pool, [4] * 6), tag=DecTag.Z_FWD, step=3
    )
    assert lift(got, pk.n).reshape(-1).tolist() == [4] * 6


def test_identical_repeat_is_answered_from_cache(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(trio, policy_for(job_id, pk))
    bank = trio.ch["bank"]
    masked = tensor(trio.cipher, pool, [9] * 6)
    request = bank.send(
        Envelope(
            job_id=job_id,
            sender=BANK,
            receiver=ARBITER,
            tag=DecTag.Z_FWD,
            step=4,
            key_id=pk.key_id,
            body=masked.to_block(),
        )
    )
    first = bank.recv(job_id=job_id, sender=ARBITER, tag=DecTag.Z_FWD, step=4, timeout=20)
    decryptions: list[int] = []
    real = trio.service._decrypt
    monkeypatch.setattr(trio.service, "_decrypt", lambda v: decryptions.append(len(v)) or real(v))
    bank.send(request)  # the byte-identical request again (as after a lost reply)
    assert decryptions == []  # answered without a new decryption
    assert (
        first.body is not None and bank._mailbox.pending() == 0
    )  # the resent reply was a duplicate
    # policy level: the same digest is CACHED, another digest refused
    assert (
        trio.policy.admit(
            job_id=job_id,
            step=4,
            tag=DecTag.Z_FWD.value,
            requester="bank",
            count=6,
            digest=_digest(request),
        )
        is Admission.CACHED
    )


def _digest(env: Envelope) -> bytes:
    import hashlib

    assert env.body is not None
    return hashlib.sha256(env.key_id + repr(env.body.shape).encode() + env.payload).digest()


def test_cached_reply_reaches_a_requester_that_lost_it(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str
) -> None:
    register(trio, policy_for(job_id, pk))
    bank = trio.ch["bank"]
    request = bank.send(
        Envelope(
            job_id=job_id,
            sender=BANK,
            receiver=ARBITER,
            tag=DecTag.Z_FWD,
            step=5,
            key_id=pk.key_id,
            body=tensor(trio.cipher, pool, [3] * 6).to_block(),
        )
    )
    first = bank.recv(job_id=job_id, sender=ARBITER, tag=DecTag.Z_FWD, step=5, timeout=20)
    # a restarted requester has no replay marks for the reply: the resent reply is accepted
    trio.ch["bank"]._mailbox._replay._seqs.clear()  # noqa: SLF001 - simulate the lost reply
    trio.ch["bank"]._mailbox._replay._logical.clear()  # noqa: SLF001
    bank.send(request)
    second = bank.recv(job_id=job_id, sender=ARBITER, tag=DecTag.Z_FWD, step=5, timeout=20)
    assert second == first


def test_mismatching_job_specs_refuse_the_job(trio: Trio, pk: PublicKey, job_id: str) -> None:
    trio.policy.propose(policy_for(job_id, pk, count=6), submitter="bank")
    with pytest.raises(PolicyViolationError, match="disagrees"):
        trio.policy.propose(policy_for(job_id, pk, count=7), submitter="retailer")


def test_plaintext_mode_goes_through_the_same_service(
    pk: PublicKey, pool: ObfuscatorPool, executor: LocalProcessExecutor, job_id: str
) -> None:
    plain = PlaintextCipher(pk, i_understand_nothing_is_encrypted=True)
    t = Trio(pk, None, plain, executor)
    try:
        register(t, policy_for(job_id, pk))
        got = t.client("bank", job_id).decrypt(
            tensor(plain, pool, [-1, 2, -3, 4, -5, 6]), tag=DecTag.Z_FWD, step=0
        )
        assert lift(got, pk.n).reshape(-1).tolist() == [-1, 2, -3, 4, -5, 6]
    finally:
        t.close()


def test_arbiter_sees_only_masked_values(
    trio: Trio, pk: PublicKey, pool: ObfuscatorPool, job_id: str, sk: PrivateKey
) -> None:
    register(trio, policy_for(job_id, pk))
    seen: list[int] = []
    real = trio.service._decrypt
    trio.service._decrypt = lambda v: (r := real(v), seen.extend(int(x) for x in r))[0]  # type: ignore[method-assign]
    trio.client("bank", job_id).decrypt(
        tensor(trio.cipher, pool, [0] * 6), tag=DecTag.Z_FWD, step=9
    )
    assert len(seen) == 6 and all(x != 0 for x in seen)  # zeros went in; A saw m + R
    assert len(set(seen)) == 6


class _Recording(InlineExecutor):
    """Runs chunks here and keeps every chunk it was given."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def map(self, fn, chunks):  # type: ignore[no-untyped-def]
        self.chunks.extend(chunks)
        return super().map(fn, chunks)


def test_workers_that_load_the_key_file_never_receive_the_key(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey, cipher: PaillierCipher, pool: ObfuscatorPool
) -> None:
    """The arbiter on a Ray cluster (Ray TLS on): chunks carry the key file's path and key id."""
    key_file = tmp_path / "arbiter_key.json"
    key_file.write_bytes(key_file_bytes(pk, sk))
    recording = _Recording()
    t = Trio(pk, sk, cipher, recording, key_file=key_file)
    try:
        register(t, policy_for("job-keyfile", pk))
        values = [-5, 0, 7, 2**40, -(2**50), 123]
        got = t.client("bank", "job-keyfile").decrypt(
            tensor(cipher, pool, values), tag=DecTag.Z_FWD, step=0
        )
        assert lift(got, pk.n).reshape(-1).tolist() == values
    finally:
        t.close()
    assert recording.chunks
    for path, key_id, _values in recording.chunks:
        assert (path, key_id) == (str(key_file), pk.key_id)
    secrets_ = {int(sk.p), int(sk.q)}
    assert not any(int(v) in secrets_ for c in recording.chunks for v in c[2])


def test_a_key_file_with_another_key_is_refused(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    other_pk, other_sk = generate_keypair(bits=512, allow_test_key=True)
    key_file = tmp_path / "arbiter_key.json"
    key_file.write_bytes(key_file_bytes(other_pk, other_sk))
    with pytest.raises(CryptoError, match="holds another key"):
        _decrypt_chunk_from_file((str(key_file), pk.key_id, [mpz(1)]))
