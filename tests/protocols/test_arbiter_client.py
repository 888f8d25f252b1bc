"""The one arbiter client (A1-A6 of protocols.arbiter.client) against the real arbiter service
over in-memory channels, and against an arbiter that lies (docs/protocol.md §2.5, §2.6, §4.4.1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
import pytest

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.fixedpoint import lift
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy, JobPolicy, PolicyRule, StepWindow
from protocols.crypto.tensor import EncryptedTensor, encrypt
from protocols.envelope import PlainBlock
from protocols.errors import (
    InsecureConfigError,
    JobRefusedError,
    KeyMismatchError,
    MalformedEnvelopeError,
    NoSpaceError,
    PolicyViolationError,
)
from protocols.executor import InlineExecutor
from protocols.link import JobLink
from protocols.roles import Party
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.inmemory import InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER

T = TypeVar("T")
TIMEOUT = 10.0


class ClientTag(StrEnum):
    """A job's one decryption tag (requester: the guest)."""

    Z = "clienttest.Z"


def job_policy(body: dict[str, Any]) -> JobPolicy:
    """The test's JOB_SPEC: ``{job_id, key_id}``; two values per step, a scored model."""
    return JobPolicy(
        job_id=str(body["job_id"]),
        key_id=bytes.fromhex(str(body["key_id"])),
        rules=(PolicyRule(ClientTag.Z.value, "bank", 2, window=StepWindow(stop=8), rewind=2),),
        parties=("bank", "retailer"),
        max_resumes=4,
        scoring_unit=2,
    )


def admit(body: dict[str, Any], sender: Party) -> None:
    """A's own acceptance policy: a spec asking for ``forbidden`` is refused."""
    if body.get("forbidden"):
        raise JobRefusedError("forbidden jobs are not accepted here (accept.test)")


@dataclass
class Trio:
    channels: dict[str, Channel]
    policy: DecryptionPolicy

    def client(self, party: str, job_id: str, run_id: str = "r1", **kwargs: Any) -> ArbiterClient:
        link = JobLink(channel=self.channels[party], job_id=job_id, run_id=run_id, timeout=TIMEOUT)
        return ArbiterClient(link=link, arbiter=ARBITER, **kwargs)


def network(*enums: type[StrEnum]) -> dict[str, Channel]:
    net = InMemoryNetwork()
    return {
        p.party_id: net.channel(p, tags=TagRegistry([SetupTag, ClientTag, *enums]))
        for p in (BANK, RETAILER, ARBITER)
    }


@pytest.fixture
def trio(pk: PublicKey, sk: PrivateKey) -> Iterator[Trio]:
    channels = network()
    policy = DecryptionPolicy()
    service = ArbiterService(
        channel=channels["arbiter"],
        cipher=PaillierCipher(pk),
        private_key=sk,
        policy=policy,
        executor=InlineExecutor(),
    )
    service.serve(ClientTag)
    service.serve_setup(job_policy, admit=admit)
    yield Trio(channels, policy)
    for channel in channels.values():
        channel.close()


def both(bank: Callable[[], T], retailer: Callable[[], T]) -> tuple[T, T]:
    """Run the two parties' halves of a handshake A answers once both asked."""
    with ThreadPoolExecutor(2) as pool:
        g, h = pool.submit(bank), pool.submit(retailer)
        return g.result(timeout=TIMEOUT), h.result(timeout=TIMEOUT)


def tensor(pk: PublicKey, values: list[int]) -> EncryptedTensor:
    pool = ObfuscatorPool(pk, executor=InlineExecutor())
    try:
        return encrypt(PaillierCipher(pk), np.array(values, dtype=object), pool=pool, scale=0)
    finally:
        pool.close()


def test_a_job_from_key_to_close(trio: Trio, pk: PublicKey, job_id: str) -> None:
    """A1-A4 and A6 with both parties: key, registration, a decryption, a new run, the close."""
    g = trio.client("bank", job_id, allow_test_key=True)
    h = trio.client("retailer", job_id, allow_test_key=True)
    assert g.public_key() == pk  # A1
    spec = {"job_id": job_id, "key_id": pk.key_id.hex()}
    both(lambda: g.register(spec), lambda: h.register(spec))  # A2
    got = g.decrypt(tensor(pk, [-3, 2**40]), tag=ClientTag.Z, step=0)  # A6
    assert lift(got, pk.n).tolist() == [-3, 2**40]
    with pytest.raises(PolicyViolationError, match="may not request"):
        h.decrypt(tensor(pk, [1, 1]), tag=ClientTag.Z, step=1)
    both(lambda: g.resume(step=0, tag_steps={}), lambda: h.resume(step=0, tag_steps={}))  # A3
    assert both(lambda: g.finish(timeout=TIMEOUT), lambda: h.finish(timeout=TIMEOUT)) == (
        True,
        True,
    )  # A4: closed, its model registered for scoring
    assert trio.policy.closed(job_id)
    with pytest.raises(PolicyViolationError, match="finished"):
        g.decrypt(tensor(pk, [1, 1]), tag=ClientTag.Z, step=1)


def test_a_run_after_the_first_is_opened_and_the_first_needs_none(
    trio: Trio, pk: PublicKey, job_id: str
) -> None:
    g, h = trio.client("bank", job_id), trio.client("retailer", job_id)
    spec = {"job_id": job_id, "key_id": pk.key_id.hex()}
    both(lambda: g.register(spec), lambda: h.register(spec))
    g.open_run(1)  # nothing sent: a second one would wait for the other party
    both(lambda: g.open_run(2), lambda: h.open_run(2))
    g, h = trio.client("bank", job_id, "r3"), trio.client("retailer", job_id, "r3")
    with pytest.raises(PolicyViolationError, match="not a new run"):
        both(lambda: g.open_run(2), lambda: h.open_run(2))


def test_refusals_are_typed_errors(trio: Trio, pk: PublicKey, job_id: str) -> None:
    """A's acceptance policy refuses a JOB_SPEC as JobRefusedError (not retried); a RESUME of
    a job A does not know as PolicyViolationError; both with A's reason."""
    g, h = trio.client("bank", job_id), trio.client("retailer", job_id)
    spec = {"job_id": job_id, "key_id": pk.key_id.hex(), "forbidden": True}
    with pytest.raises(JobRefusedError, match=r"arbiter refused .*accept\.test.*\[accept\]"):
        g.register(spec)
    with pytest.raises(PolicyViolationError, match="no such job"):
        h.resume(step=3, tag_steps={ClientTag.Z.value: 1})


def test_a_small_key_needs_allow_test_key(trio: Trio) -> None:
    """The session fixtures' key has 1024 bits: refused unless the test-only flag is set."""
    with pytest.raises(InsecureConfigError, match="insecure"):
        trio.client("bank", "small-key").public_key()


class LyingArbiter:
    """Answers each request the way a test says (an arbiter that deviates)."""

    def __init__(self, answer: Callable[[JobLink, Any], None]) -> None:
        self.channels = network()
        self.link = JobLink(channel=self.channels["arbiter"], job_id="lie", run_id="r1")
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        request = self.link.recv_any(BANK, [*SetupTag, *ClientTag], timeout=TIMEOUT)
        self._answer(self.link, request)

    def client(self, **kwargs: Any) -> ArbiterClient:
        link = JobLink(channel=self.channels["bank"], job_id="lie", run_id="r1", timeout=TIMEOUT)
        return ArbiterClient(link=link, arbiter=ARBITER, **kwargs)

    def close(self) -> None:
        self._thread.join(TIMEOUT)
        for channel in self.channels.values():
            channel.close()


def test_a_key_whose_id_is_not_its_own_is_refused(pk: PublicKey) -> None:
    forged = dict(pk.to_json(), key_id="00" * 16)
    a = LyingArbiter(lambda link, r: link.reply(r, SetupTag.KEY, {"public_key": forged}))
    try:
        with pytest.raises(KeyMismatchError):
            a.client(allow_test_key=True).public_key()
    finally:
        a.close()


def test_a_key_answer_without_a_key_is_malformed() -> None:
    a = LyingArbiter(lambda link, r: link.reply(r, SetupTag.KEY, {"public_key": "n"}))
    try:
        with pytest.raises(MalformedEnvelopeError, match="holds no key"):
            a.client().public_key()
    finally:
        a.close()


def test_no_space_is_read_from_the_flag_never_from_the_text() -> None:
    """A refusal whose text claims a full folder is a plain refusal; the flag makes it one."""
    text = "no space left in the arbiter's state folder"
    a = LyingArbiter(lambda link, r: link.refuse(r, SetupTag.JOB_READY, text))
    try:
        with pytest.raises(JobRefusedError) as caught:
            a.client().register({"job_id": "lie"})
        assert not isinstance(caught.value, NoSpaceError)
    finally:
        a.close()
    a = LyingArbiter(lambda link, r: link.refuse(r, SetupTag.RESUMED, text, no_space=True))
    try:
        with pytest.raises(NoSpaceError, match="cannot go on"):
            a.client().resume(step=0, tag_steps={})
    finally:
        a.close()


def test_a_decryption_answer_under_another_key_or_shape_is_refused(pk: PublicKey) -> None:
    def answer(key_id: bytes, count: int) -> Callable[[JobLink, Any], None]:
        def reply(link: JobLink, request: Any) -> None:
            data = pk.residues_to_bytes([0] * count)
            link.reply(request, ClientTag.Z, PlainBlock(data, shape=(count,)), key_id=key_id)

        return reply

    for lie, error in (
        (answer(b"\x01" * 16, 2), KeyMismatchError),
        (answer(pk.key_id, 3), MalformedEnvelopeError),
    ):
        a = LyingArbiter(lie)
        try:
            with pytest.raises(error):
                a.client().decrypt(tensor(pk, [1, 2]), tag=ClientTag.Z, step=0)
        finally:
            a.close()


def test_finish_without_an_answer_logs_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    """A4: no answer in time: the model cannot be scored, the job's result stands."""
    a = LyingArbiter(lambda link, r: None)
    try:
        with caplog.at_level(logging.WARNING, logger="protocols.arbiter.client"):
            assert a.client().finish(timeout=0.2) is False
        assert "did not register its model for scoring" in caplog.text
    finally:
        a.close()
