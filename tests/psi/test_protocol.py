"""The PSI flow over the in-memory channel: P1, P4-P8, modes and a property test."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.envelope import Envelope, PointBlock
from protocols.errors import AlignmentError, InvalidPointError
from protocols.executor import InlineExecutor
from protocols.transport.base import Channel
from psi import ecdh
from psi.canon import IdType, prepare_ids
from psi.inprocess import align_in_process, channel_pair
from psi.protocol import PsiMode, PsiOptions, PsiResult, PsiTag, run_guest
from tests.conftest import BANK, RETAILER

INLINE = InlineExecutor()


@dataclass
class Outcome:
    guest: PsiResult
    host: PsiResult
    sent: dict[str, list[Envelope]]


def channels() -> tuple[Channel, Channel]:
    return channel_pair(BANK, RETAILER)


def record(channel: Channel, log: list[Envelope]) -> None:
    original = channel.send

    def send(envelope: Envelope) -> Envelope:
        log.append(envelope)
        return original(envelope)

    channel.send = send  # type: ignore[method-assign]


def run(
    guest_ids: list[str],
    host_ids: list[str],
    *,
    options: PsiOptions = PsiOptions(chunk_points=7, task_points=3),
    id_type: IdType = IdType.GENERIC,
    host_id_type: IdType | None = None,
    job_id: str = "psi-job",
    tamper: Callable[[Channel], None] | None = None,
    pair: tuple[Channel, Channel] | None = None,
) -> Outcome:
    cg, ch = pair or channels()
    sent: dict[str, list[Envelope]] = {"guest": [], "host": []}
    record(cg, sent["guest"])
    record(ch, sent["host"])
    if tamper is not None:
        tamper(ch)
    guest, host = align_in_process(
        guest_ids=prepare_ids(guest_ids, id_type=id_type),
        host_ids=prepare_ids(host_ids, id_type=host_id_type or id_type),
        guest_executor=INLINE,
        options=options,
        job_id=job_id,
        timeout=10,
        channels=(cg, ch),
    )
    return Outcome(guest, host, sent)


def ids(prefix: str, values: range | list[int]) -> list[str]:
    return [f"{prefix}{v}" for v in values]


@pytest.mark.parametrize(
    "guest, host, expected",
    [
        (range(0, 50), range(100, 150), 0),  # disjoint
        (range(0, 50), range(49, 120), 1),
        (range(0, 1500), range(500, 2500), 1000),
        (range(0, 40), range(0, 40), 40),  # full
    ],
)
def test_p1_both_parties_get_the_intersection_in_one_order(
    guest: range, host: range, expected: int
) -> None:
    g, h = ids("c", list(guest)), ids("c", list(host))
    random.Random(1).shuffle(h)
    out = run(g, h, options=PsiOptions(chunk_points=256, task_points=64))
    assert out.guest.intersection_size == out.host.intersection_size == expected
    assert out.guest.rows is not None and out.host.rows is not None
    assert [g[i] for i in out.guest.rows] == [h[i] for i in out.host.rows]
    assert set(g[i] for i in out.guest.rows) == set(g) & set(h)


def test_intersection_of_canonical_forms() -> None:
    g = [" Alice@EXAMPLE.com", "bob@example.com", "carol@example.com", ""]
    h = ["alice@example.com ", "BOB@example.COM", "dave@example.com", "not an email"]
    out = run(g, h, id_type=IdType.EMAIL)
    assert sorted(g[i].strip().lower() for i in out.guest.rows) == [
        "alice@example.com",
        "bob@example.com",
    ]  # type: ignore[union-attr]
    assert out.guest.summary["rejected"] == {"empty": 1} and out.host.summary["rejected"] == {
        "pattern": 1
    }


@settings(max_examples=12, deadline=None)
@given(st.sets(st.integers(0, 60), max_size=25), st.sets(st.integers(0, 60), max_size=25))
def test_property_equals_plain_intersection(a: set[int], b: set[int]) -> None:
    g, h = ids("id-", sorted(a) or [999]), ids("id-", sorted(b) or [998])
    out = run(g, h, options=PsiOptions(chunk_points=5, task_points=2))
    assert {g[i] for i in out.guest.rows} == set(g) & set(h)  # type: ignore[union-attr]
    assert [g[i] for i in out.guest.rows] == [h[i] for i in out.host.rows]  # type: ignore[union-attr]


def points_sent(envelopes: list[Envelope], tag: PsiTag) -> list[bytes]:
    data = b"".join(e.payload for e in envelopes if e.tag == tag and isinstance(e.body, PointBlock))
    return [data[i : i + 32] for i in range(0, len(data), 32)]


def test_p4_wire_audit() -> None:
    g, h = ids("user", range(0, 60)), ids("user", range(30, 90))
    out = run(g, h, options=PsiOptions(chunk_points=16, task_points=5, pad_to=70))
    salt = bytes.fromhex(out.guest.run_id)
    prefix = ecdh.dst("generic") + salt
    hashed = {ecdh.hash_to_curve(f"generic:{x}".encode(), prefix=prefix) for x in g + h}
    import hashlib

    raw = {hashlib.sha512(f"generic:{x}".encode()).digest()[:32] for x in g + h}
    for who, tag in (("guest", PsiTag.A_G), ("host", PsiTag.A_H), ("host", PsiTag.D_G)):
        points = points_sent(out.sent[who], tag)
        assert len(points) == 70 and len(set(points)) == 70  # padded, no duplicates
        ecdh.validate(b"".join(points))  # 32 bytes, canonical
        assert all(ecdh.on_curve(int.from_bytes(p, "little")) for p in points)
        assert not (set(points) & hashed) and not (set(points) & raw)


def test_p5_cardinality_only(monkeypatch: pytest.MonkeyPatch) -> None:
    keys: list[bytes] = []
    real_new_key = ecdh.new_key

    def spy() -> bytes:
        keys.append(real_new_key())
        return keys[-1]

    monkeypatch.setattr(ecdh, "new_key", spy)
    taus = []
    for trial in range(20):
        keys.clear()
        g, h = ids("x", range(0, 40)), ids("x", range(10, 60))
        out = run(
            g,
            h,
            options=PsiOptions(mode=PsiMode.CARDINALITY, chunk_points=16, task_points=8),
            job_id=f"card-{trial}",
        )
        assert (
            out.guest.intersection_size == 30 and out.guest.rows is None and out.host.rows is None
        )
        # with the host's key (keys[1]) recompute D_G in A_G order and compare with the order sent
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        a_g = b"".join(points_sent(out.sent["guest"], PsiTag.A_G))
        expected = ecdh.mask(X25519PrivateKey.from_private_bytes(keys[1]), a_g)
        expected_list = [expected[i : i + 32] for i in range(0, len(expected), 32)]
        sent = points_sent(out.sent["host"], PsiTag.D_G)
        position = {p: i for i, p in enumerate(sent)}
        order = [position[p] for p in expected_list]
        taus.append(_kendall_tau(order))
    assert abs(float(np.mean(taus))) < 0.1


def _kendall_tau(order: list[int]) -> float:
    n = len(order)
    s = sum(np.sign(order[j] - order[i]) for i in range(n) for j in range(i + 1, n))
    return float(s) / (n * (n - 1) / 2)


@pytest.mark.parametrize("sizes", [(5, 50), (50, 5), (1, 1)])
def test_p6_padding_hides_sizes(sizes: tuple[int, int]) -> None:
    g, h = ids("p", range(sizes[0])), ids("p", range(sizes[1]))
    out = run(g, h, options=PsiOptions(pad_to=64, chunk_points=10, task_points=7))
    for who, tag in (("guest", PsiTag.A_G), ("host", PsiTag.A_H), ("host", PsiTag.D_G)):
        assert len(points_sent(out.sent[who], tag)) == 64
    assert out.guest.intersection_size == min(sizes)
    assert out.guest.own_list_size == out.guest.peer_list_size == 64


def test_p6_more_ids_than_padding_is_refused() -> None:
    cg, _ = channels()
    with pytest.raises(
        AlignmentError, match="exceed the agreed padding"
    ):  # before anything is sent
        run_guest(
            channel=cg,
            host=RETAILER,
            job_id="pad",
            ids=prepare_ids(ids("p", range(10)), id_type=IdType.GENERIC),
            executor=INLINE,
            options=PsiOptions(pad_to=5),
        )


def test_p7_runs_are_unlinkable() -> None:
    g = ids("same", range(30))
    first = set(points_sent(run(g, g, job_id="r1").sent["guest"], PsiTag.A_G))
    second = set(points_sent(run(g, g, job_id="r2").sent["guest"], PsiTag.A_G))
    assert not first & second


def test_guest_only_mode() -> None:
    g, h = ids("q", range(20)), ids("q", range(10, 30))
    out = run(g, h, options=PsiOptions(mode=PsiMode.GUEST_ONLY, pad_to=25))
    assert (
        out.guest.intersection_size == 10
        and out.host.rows is None
        and out.host.intersection_size is None
    )
    assert not any(e.tag == PsiTag.RESULT for e in out.sent["guest"])
    # batch scoring (§5.2): G's positions in A_H point at H's rows of the same ids
    assert out.guest.rows is not None and out.guest.peer_positions is not None
    list_rows = out.host.list_rows
    assert list_rows is not None and list_rows.shape == (25,)
    assert sorted(list_rows[list_rows >= 0].tolist()) == list(range(20))
    matched = list_rows[out.guest.peer_positions]
    assert [g[i] for i in out.guest.rows] == [h[i] for i in matched]


def test_p8_a_malformed_chunk_aborts_with_a_typed_error() -> None:
    def corrupt(channel: Channel) -> None:
        original = channel.send

        def send(envelope: Envelope) -> Envelope:
            if (
                envelope.tag == PsiTag.A_H
                and envelope.step == 0
                and isinstance(envelope.body, PointBlock)
            ):
                bad = bytearray(envelope.body.data)
                bad[31] |= 0x80  # bit 255 set
                envelope = Envelope(**{**envelope.__dict__, "body": PointBlock(bytes(bad))})
            return original(envelope)

        channel.send = send  # type: ignore[method-assign]

    pair = channels()
    with pytest.raises(InvalidPointError, match="bit 255"):
        run(
            ids("m", range(10)),
            ids("m", range(10)),
            tamper=corrupt,
            options=PsiOptions(chunk_points=4, task_points=2, timeout=5),
            pair=pair,
        )
    # the failed run's unread chunks are dropped: they hold no budget (protocol §2.9.1)
    for channel in pair:
        assert channel._mailbox.pending() == 0
        assert all(channel._mailbox.queued_bytes(p) == 0 for p in ("bank", "retailer"))


def test_mismatching_id_types_are_refused() -> None:
    with pytest.raises(AlignmentError, match="canonicalisation differs"):
        run(["a@b.c"], ["a@b.c"], id_type=IdType.EMAIL, host_id_type=IdType.GENERIC)


def test_p8_duplicates_across_chunks_abort() -> None:
    def duplicate(channel: Channel) -> None:
        original = channel.send
        first: list[bytes] = []

        def send(envelope: Envelope) -> Envelope:
            if envelope.tag == PsiTag.A_H and isinstance(envelope.body, PointBlock):
                if envelope.step == 0:
                    first.append(envelope.body.data[:32])
                elif envelope.step == 1:  # repeat chunk 0's first point in chunk 1
                    envelope = Envelope(
                        **{
                            **envelope.__dict__,
                            "body": PointBlock(first[0] + envelope.body.data[32:]),
                        }
                    )
            return original(envelope)

        channel.send = send  # type: ignore[method-assign]

    with pytest.raises(InvalidPointError, match="duplicate"):
        run(
            ids("d", range(10)),
            ids("d", range(10)),
            tamper=duplicate,
            options=PsiOptions(chunk_points=4, task_points=2, timeout=5),
        )
