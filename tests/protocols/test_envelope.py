"""Envelope codec: round trips, digests and every malformed-input rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.envelope import (
    CipherBlock,
    ControlBlock,
    Envelope,
    IndexBlock,
    PlainBlock,
    PointBlock,
    Uint64Block,
    decode,
    digest,
    encode,
)
from protocols.errors import MalformedEnvelopeError
from protocols.generated import transport_pb2 as pb
from tests.conftest import BANK, RETAILER


def make(**kw: object) -> Envelope:
    base: dict[str, object] = {
        "job_id": "j",
        "sender": BANK,
        "receiver": RETAILER,
        "tag": "test.DATA",
        "seq": 1,
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


@given(
    step=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
    shape=st.lists(st.integers(1, 5), max_size=3),
)
def test_codec_roundtrip(step: int, epoch: int, payload: bytes, shape: list[int]) -> None:
    envelope = make(step=step, epoch=epoch, body=PointBlock(bytes(32) * (len(payload) % 4)))
    assert decode(*encode(envelope)) == envelope
    n = int(np.prod(shape)) if shape else 1
    u64 = Uint64Block(bytes(8 * n), shape=tuple(shape))
    assert decode(*encode(make(body=u64))) == make(body=u64)
    plain = PlainBlock(payload * n, shape=(n,) if payload else ())
    assert decode(*encode(make(body=plain))) == make(body=plain)


def test_header_is_small_and_deterministic() -> None:
    envelope = make(body=CipherBlock(bytes(1 << 20), shape=(2048,), scale=24))
    header, payload = encode(envelope)
    assert len(header) < 100 and len(payload) == 1 << 20
    assert encode(envelope)[0] == header
    assert digest(header, payload) == digest(*encode(envelope))
    assert digest(header, payload) != digest(*encode(make(seq=2, body=envelope.body)))


def test_index_block_roundtrip_and_bounds() -> None:
    block = IndexBlock.from_indices([0, 7, 2**32 - 1])
    assert block.indices().tolist() == [0, 7, 2**32 - 1]
    with pytest.raises(ValueError):
        IndexBlock.from_indices([-1])


def test_control_block_json() -> None:
    block = ControlBlock.from_obj({"b": 1, "a": [1, 2]})
    assert block.data == b'{"a":[1,2],"b":1}' and block.obj() == {"a": [1, 2], "b": 1}


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"job_id": ""}, "not a valid identifier"),
        ({"job_id": "x" * 200}, "1-128"),
        ({"job_id": "a\nb"}, "not a valid identifier"),
        ({"job_id": "."}, "job_id"),
        ({"job_id": ".."}, "job_id"),
        ({"job_id": "/etc/vfl"}, "job_id"),
        ({"job_id": "a/../b"}, "job_id"),
        ({"job_id": "a\\b"}, "job_id"),
        ({"job_id": "C:x"}, "job_id"),
        ({"run_id": "../r"}, "run_id"),
        ({"step": -1}, "step"),
        ({"epoch": 2**32}, "epoch"),
        ({"key_id": b"k" * 65}, "key_id"),
        ({"body": "not a block"}, "body"),
    ],
)
def test_invalid_envelopes_are_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=needle):
        make(**kw)


def header(**fields: object) -> pb.Envelope:
    msg = pb.Envelope(
        job_id="j",
        sender=pb.GUEST,
        receiver=pb.HOST,
        sender_id="bank",
        receiver_id="retailer",
        tag="test.DATA",
        seq=1,
    )
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


@pytest.mark.parametrize(
    "msg_factory, payload, needle",
    [
        (lambda: header(sender=0), b"", "role"),
        (lambda: header(sender_id="Bad Id"), b"", "addressing"),
        (lambda: header(), b"xx", "payload but no body"),
        (lambda: _with(header(), "points"), b"x" * 33, "32-byte"),
        (lambda: _with(header(), "index"), b"x" * 5, "uint32"),
        (lambda: _with(header(), "masked_u64", shape=[2]), b"x" * 8, "needs 16 bytes"),
        (lambda: _with(header(), "cipher", shape=[3]), b"x" * 10, "whole number"),
        (lambda: _with(header(), "control"), b"\xff", "UTF-8 JSON"),
        (lambda: _with(header(), "plain", data=b"inline"), b"", "block data"),
    ],
)
def test_malformed_headers_are_refused(msg_factory: object, payload: bytes, needle: str) -> None:
    msg = msg_factory()  # type: ignore[operator]
    with pytest.raises(MalformedEnvelopeError, match=needle):
        decode(msg.SerializeToString(), payload)


def test_truncated_header_is_refused() -> None:
    raw, _ = encode(make())
    with pytest.raises(MalformedEnvelopeError, match="does not decode"):
        decode(raw[:-3], b"")


def _with(msg: pb.Envelope, kind: str, **fields: object) -> pb.Envelope:
    block = getattr(msg, kind)
    block.SetInParent()
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(block, k).extend(v)
        else:
            setattr(block, k, v)
    return msg


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"[" * 50_000 + b"]" * 50_000, "not valid"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "deeper than 32"),
        (b'{"n":' + b"9" * 5000 + b"}", "more than 40 digits"),
        (b'{"n":-' + b"9" * 41 + b"}", "more than 40 digits"),
        (b'{"n":NaN}', "non-standard constant"),
        (b'{"lr":1e999}', "out of range"),
        (b'{"lr":1e300}', "out of range"),
        (b'{"a":"' + b"x" * (1 << 20) + b'"}', "exceeds"),
        (b'{"n":Infinity}', "non-standard constant"),
        (b"\xff\xfe", "not valid"),
        (b"[1]", "JSON object"),
    ],
)
def test_hostile_control_blocks_raise_a_typed_error(data: bytes, needle: str) -> None:
    msg = header()
    msg.control.SetInParent()
    with pytest.raises(MalformedEnvelopeError, match=needle):
        decode(msg.SerializeToString(), data)


def test_hostile_shapes_and_headers_are_refused_cheaply() -> None:
    msg = header()
    msg.masked_u64.shape.extend([1] * 500)
    with pytest.raises(MalformedEnvelopeError, match="dimensions"):
        decode(msg.SerializeToString(), b"")
    msg = header(job_id="j" * 20_000)
    with pytest.raises(MalformedEnvelopeError, match="header of"):
        decode(msg.SerializeToString(), b"")
