"""Robustness of the three party services (bank, retailer, arbiter as ``vfl serve`` processes
over mutual TLS on this machine): hostile envelopes, stalled streams, killed parties and a
full state folder.

* ``fuzz_envelopes``: ``--fuzz`` (10,000) random and mutated envelopes (valid envelopes of
  every body kind, then bit flips, truncation, random bytes and fields, hostile job ids such
  as ``.``, ``..``, ``/abs`` and control characters, invalid UTF-8, deep and huge-integer
  JSON, wrong shapes, sizes, roles, receivers, senders and tags, reused sequence numbers),
  a fixed seed. Each goes through :func:`protocols.envelope.decode` and through the real
  receive path of the arbiter's service, as ``Deliver`` and as ``Push``, with the bank's
  valid certificate; frame-level cases (garbage frames, payload sizes that lie, streams
  that end early or run long) go through gRPC only. ``untyped_errors`` counts refusals
  that are not typed: a decode exception that is no :class:`VflError`, a gRPC status
  ``INTERNAL`` or ``UNKNOWN`` (target 0); ``handler_crashes`` counts handler exceptions
  the service logged; ``rss_growth_mb`` is the arbiter process's resident memory after
  the fuzz over before it (target < 50; it keeps the envelopes that were valid, unread, in
  its mailbox, as it should).
* ``stalled_streams``: while the bank (a valid peer) holds ``--stalled-streams`` (8: more
  than the gRPC server's 8 worker threads) ``Push`` streams open at the arbiter, each
  after a frame header and nothing else, the retailer sends ``--honest`` small envelopes
  (a registered tag, stored for a job nobody reads) one after the other, each with a
  ``--honest-deadline`` s deadline; ``stalled_streams_honest_p99_ms`` against
  ``unloaded_p99_ms``, the same envelopes before the streams (target: at most 3x).
  Envelopes that miss their deadline count at the deadline, and after 5 of them in a row
  the stalled phase stops (``honest_missed``); ``recovered`` says whether the arbiter
  serves again once the streams are cancelled.
* ``kill_trials``: ``--kill-trials`` (20) split-NN jobs (breast, 2 epochs, d = k = 4,
  batch 64, no label noise, fixed seeds) after an uninterrupted reference run; in each, one
  party drawn with a seeded RNG (guest, host or arbiter) gets SIGKILL at a random moment
  (uniform over 2-90 % of the reference run's duration after submission; the reference
  is the second of two uninterrupted runs, which must agree) and is started again;
  ``killed_mid_job`` says how many kills found the job still running.
  ``kill_results_identical``: trials that finished with exactly the reference's
  test scores (target all); ``lost_or_duplicated``: trials that never finished, failed,
  finished twice (two ``job_finished`` records at the bank) or with another result
  (target 0). Key size: 2048 bits is the rule outside tests; ``--key-bits`` below 2048
  uses the arbiter's explicit test key (``allow_test_key``, as the tests do) and the JSON
  says so in ``key_bits``.
* ``disk_full_trials``: for each of ``--disk-parties`` (bank, retailer, arbiter), a fresh
  set of services whose one party keeps its state folder on a tmpfs of ``--tmpfs-kib``
  KiB; a job is held after its third step (``[testing] allow_hold``), the tmpfs is filled
  up with a filler file, the job released. Pass: the party stops the job with an error
  naming its folder (``no space left in <folder>``, in the bank's status and the party's
  log), every file in the folder still parses (JSON, JSON lines, checkpoints, the model),
  and once the filler is deleted the job resumes and finishes with exactly the reference
  run's scores. Needs root (mount); skipped otherwise.

Every section records pass/fail against its targets; times as median and spread.
Output: ``benchmarks/results/robustness.json`` (``--quick``: 1,000 fuzz cases, 50 honest
envelopes, 2 kill trials and one disk-full trial with a 512-bit test key, written to
``--out`` only if given).

Usage: ``python -m benchmarks.robustness [--quick] [--sections fuzz,stall,kill,disk]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: keep benchmarks/ off the import path so `psi` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from protocols.arbiter.service import SetupTag
from protocols.envelope import (
    CipherBlock,
    ControlBlock,
    Envelope,
    IndexBlock,
    PlainBlock,
    PointBlock,
    Uint64Block,
    decode,
    encode,
)
from protocols.errors import VflError
from protocols.files import atomic_write
from protocols.generated import transport_pb2 as pb
from protocols.roles import Party, Role
from protocols.transport.grpc_client import DELIVER, PUSH, open_channel
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity
from vfl.common import checkpoint as ckpt
from vfl.data.datasets import data_dir
from vfl.service.admin import admin_call, service_address
from vfl.service.demo import write_cluster_setup
from vfl.service.local import LocalCluster
from vfl.service.party import ServiceTag
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobTag
from vfl.splitnn.spec import DecTag

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "robustness.json"
BANK, RETAILER, ARBITER = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
ROLES = {"bank": "guest", "retailer": "host", "arbiter": "arbiter"}
TARGET_RSS_MB = 50.0
TARGET_STALL_RATIO = 3.0

JOB = """
[job]
id = "robust"
guest_data = "breast"
host_data = "breast"
label_column = "y"
batch = 64
batch_eval = 64
epochs = 2
psi_job = "breast-psi"

[model]
d = 4
k = 4
guest_widths = [8, 4]
host_widths = [8, 4]
learning_rate = 0.02

[protect]
mode = "none"
allow_label_leak = true
"""


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip()


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    """Median, minimum, maximum and count of ``values``."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, int(np.ceil(0.99 * len(ordered))) - 1)]


# -- the services ------------------------------------------------------------------------


def start_cluster(
    root: Path,
    *,
    key_bits: int,
    before_start: Callable[[dict[str, Path]], None] | None = None,
) -> LocalCluster:
    """Bank, retailer and arbiter services as in ``tests/vfl/test_train_service.py``: fixed
    seeds, the retailer accepts jobs without label noise, the bank's jobs may be held."""
    paths = write_cluster_setup(
        root / "setup",
        data_folder=data_dir(os.environ),
        key_bits=key_bits,
        seed=11,
        host_protect_modes=["none", "marvell"],
        allow_hold=True,
    )
    if before_start is not None:
        before_start(paths)
    return LocalCluster.launch(paths, root=root)


def small_job(job_id: str, *, hold_at_step: int | None = None) -> dict[str, Any]:
    """The smallest real split-NN job (the restart tests' job), under ``job_id``."""
    raw = tomllib.loads(JOB)
    raw["job"]["id"] = job_id
    request: dict[str, Any] = {"job_file": raw}
    if hold_at_step is not None:
        request["hold_at_step"] = hold_at_step
    return request


def run_psi(cluster: LocalCluster) -> None:
    """The PSI every job here uses (one row order)."""
    psi = {"peer": "retailer", "data": "breast", "id_column": "id", "job_id": "breast-psi"}
    admin_call(cluster.configs["bank"], "psi", psi, timeout=900)


def result_of(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    path = cluster.configs["bank"].state_dir / "jobs" / job_id / "result.json"
    out: dict[str, Any] = json.loads(path.read_text())
    return out


def reference_run(cluster: LocalCluster, job_id: str) -> tuple[dict[str, Any], float]:
    """The job run without interruption: its result and seconds from submission to done."""
    started = time.monotonic()
    admin_call(cluster.configs["bank"], "train", small_job(job_id))
    state = cluster.wait(job_id, lambda s: s.get("state") == "done", timeout=3600, every=0.1)
    if state.get("state") != "done":
        raise SystemExit(f"the reference run {job_id} did not finish: {state}")
    return result_of(cluster, job_id), time.monotonic() - started


# -- fuzz_envelopes ----------------------------------------------------------------------

HOSTILE_IDS = [
    ".",
    "..",
    "/abs",
    "/etc/passwd",
    "../../x",
    "a/b",
    "a\\b",
    "\x00",
    "a\x00b",
    "\n",
    "\r\nx",
    "\x1b[31mred",
    "\x7f",
    " ",
    "",
    "-",
    "~",
    "x" * 129,
    "x" * 5000,
    "é",
    "\u202e",
    "😀",
    "NUL",
    "con",
]
UNREGISTERED_TAGS = ["fuzz.UNKNOWN", "", " ", "splitnn", "x" * 300, "\x00", "../tag"]
BAD_JSON = [
    b"[" * 40 + b"]" * 40,
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b'{"a":' * 100000 + b"1" + b"}" * 100000,
    b'{"n":' + b"9" * 1000 + b"}",
    b'{"n":-' + b"9" * 41 + b"}",
    b'{"n":NaN}',
    b'{"n":Infinity}',
    b'{"n":-Infinity}',
    b"\xff\xfe{}",
    b'{"a":"\xff"}',
    b"[]",
    b"1",
    b'"x"',
    b"null",
    b"",
    b"{",
    b'{"a":1,"a":2}',
    b'\xef\xbb\xbf{"a":1}',
    b'{"s":"' + b"x" * 100000 + b'"}',
    b'{"a":[' + b"1," * 10000 + b"1]}",
    b'{"a":1e999}',
    b'{"a":1' + b"0" * 50 + b".5}",
]


@dataclass
class FuzzCase:
    """One envelope (``header``, ``payload``) or, with ``frames``, a raw gRPC request."""

    kind: str
    header: bytes = b""
    payload: bytes = b""
    frames: list[bytes] | None = None  # gRPC only: Push frames as sent (first: the Frame)
    deliver_frame: bytes | None = None  # gRPC only: the Deliver request as sent


class Corpus:
    """Random and mutated envelopes from the bank to the arbiter (a fixed seed)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seq = time.time_ns() // 1000  # past anything the arbiter saw from the bank
        self.step = 0
        self.tags = [
            SplitTag.STEP_ACK.value,  # stored for a job nobody reads
            SplitTag.F1.value,
            JobTag.JOB_START.value,  # stored: the arbiter does not serve jobs
            ServiceTag.PING.value,  # answered with PONG
            SetupTag.KEY_REQ.value,  # answered with the key
            SetupTag.JOB_SPEC.value,  # checked by the acceptance policy, refused
            SetupTag.RESUME.value,  # refused: no such job
            DecTag.Z_FWD.value,  # refused: no such job
        ]

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        self.step += 1
        return self.seq, self.step

    def valid(self, kind: str | None = None) -> Envelope:
        """A well-formed envelope with a fresh sequence number and step."""
        rng = self.rng
        kind = kind or rng.choice(["none", "cipher", "plain", "points", "index", "u64", "control"])
        rows, cols = rng.randint(1, 3), rng.randint(1, 3)
        item = rng.choice([16, 32, 64])
        body: Any
        if kind == "cipher":
            body = CipherBlock(rng.randbytes(rows * cols * item), shape=(rows, cols), scale=3)
        elif kind == "plain":
            body = PlainBlock(rng.randbytes(rows * cols * item), shape=(rows, cols), scale=2)
        elif kind == "points":
            body = PointBlock(rng.randbytes(32 * rows))
        elif kind == "index":
            body = IndexBlock.from_indices([rng.randrange(1000) for _ in range(rows * cols)])
        elif kind == "u64":
            body = Uint64Block(rng.randbytes(8 * rows * cols), shape=(rows * cols,))
        elif kind == "control":
            body = ControlBlock.from_obj({"fuzz": rng.randrange(10**6), "x": [1, {"y": "z"}]})
        else:
            body = None
        seq, step = self._next()
        return Envelope(
            job_id=f"fuzz-{rng.randrange(4)}",
            sender=BANK,
            receiver=ARBITER,
            tag=rng.choice(self.tags),
            step=step,
            run_id=rng.choice(["", "run1", "fuzzrun"]),
            seq=seq,
            key_id=rng.randbytes(rng.choice([0, 32])),
            body=body,
        )

    def _pb(self, envelope: Envelope) -> tuple[pb.Envelope, bytes]:
        header, payload = encode(envelope)
        msg = pb.Envelope()
        msg.ParseFromString(header)
        return msg, payload

    def _fresh(self, msg: pb.Envelope) -> None:
        msg.seq, msg.step = self._next()

    def case(self) -> FuzzCase:
        """One case, its mutation drawn at random."""
        rng = self.rng
        kind = rng.choice(MUTATIONS)
        return getattr(self, f"_m_{kind}")(kind)

    # -- mutations (each returns a FuzzCase) --------------------------------------------

    def _m_valid(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid())
        return FuzzCase(kind, header, payload)

    def _m_bitflip_header(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid())
        return FuzzCase(kind, _flip(self.rng, header), payload)

    def _m_bitflip_payload(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid(self.rng.choice(["cipher", "u64", "control"])))
        return FuzzCase(kind, header, _flip(self.rng, payload))

    def _m_truncate_header(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid())
        return FuzzCase(kind, header[: self.rng.randrange(len(header))], payload)

    def _m_truncate_payload(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid(self.rng.choice(["cipher", "points", "control"])))
        return FuzzCase(kind, header, payload[: self.rng.randrange(max(len(payload), 1))])

    def _m_extend_payload(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid())
        return FuzzCase(kind, header, payload + self.rng.randbytes(self.rng.randint(1, 9)))

    def _m_random_header(self, kind: str) -> FuzzCase:
        rng = self.rng
        return FuzzCase(kind, rng.randbytes(rng.randint(0, 300)), rng.randbytes(rng.randint(0, 64)))

    def _m_random_fields(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid())
        for _ in range(rng.randint(1, 4)):
            name = rng.choice(
                ["job_id", "run_id", "tag", "sender_id", "receiver_id", "step", "epoch", "batch"]
                + ["seq", "key_id", "sender", "receiver"]
            )
            if name in ("step", "seq"):
                setattr(msg, name, rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(2**64)]))
            elif name in ("epoch", "batch"):
                setattr(msg, name, rng.choice([0, 2**32 - 1, rng.randrange(2**32)]))
            elif name in ("sender", "receiver"):
                setattr(msg, name, rng.choice([0, 1, 2, 3, 4, 99, 2**31 - 1]))
            elif name == "key_id":
                msg.key_id = rng.randbytes(rng.choice([0, 1, 64, 65, 1000]))
            else:
                setattr(msg, name, rng.choice(HOSTILE_IDS + ["bank", "retailer", "arbiter"]))
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_hostile_id(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid())
        field_name = rng.choice(["job_id", "run_id", "job_id", "tag"])
        setattr(msg, field_name, rng.choice(HOSTILE_IDS))
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_invalid_utf8(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid())
        field_name = rng.choice(["job_id", "run_id", "tag", "sender_id", "receiver_id"])
        marker = "\x01" * 6
        setattr(msg, field_name, marker)
        bad = rng.choice([b"\xff" * 6, b"a\xc3(bcd"])
        raw = msg.SerializeToString().replace(marker.encode(), bad)
        return FuzzCase(kind, raw, payload)

    def _m_huge_ints(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid(rng.choice(["cipher", "plain", "u64"])))
        block = getattr(msg, msg.WhichOneof("body") or "cipher")
        if hasattr(block, "shape"):
            del block.shape[:]
            block.shape.extend(rng.choice([[2**32 - 1], [2**32 - 1, 2**32 - 1], [0], [0, 5]]))
        if hasattr(block, "scale"):
            block.scale = rng.choice([0, 2**32 - 1])
        msg.step = 2**64 - 1
        msg.seq = rng.choice([2**64 - 1, msg.seq])
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_wrong_shape(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid(rng.choice(["cipher", "plain", "u64"])))
        block = getattr(msg, msg.WhichOneof("body") or "cipher")
        del block.shape[:]
        block.shape.extend([rng.randint(0, 9) for _ in range(rng.randint(0, 6))])
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_wrong_size(self, kind: str) -> FuzzCase:
        rng = self.rng
        header, payload = encode(self.valid(rng.choice(["points", "index", "u64", "cipher"])))
        cut = rng.randint(1, 7)
        return FuzzCase(kind, header, payload[:-cut] if len(payload) > cut else payload + b"\x00")

    def _m_body_data_in_header(self, kind: str) -> FuzzCase:
        msg, payload = self._pb(self.valid(self.rng.choice(["cipher", "control", "index"])))
        block = getattr(msg, msg.WhichOneof("body") or "cipher")
        block.data = b"smuggled"
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_bad_json(self, kind: str) -> FuzzCase:
        msg, _ = self._pb(self.valid("control"))
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), self.rng.choice(BAD_JSON))

    def _m_wrong_tag(self, kind: str) -> FuzzCase:
        msg, payload = self._pb(self.valid())
        msg.tag = self.rng.choice(UNREGISTERED_TAGS)
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_wrong_role(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid())
        if rng.random() < 0.5:
            msg.sender = rng.choice([0, 2, 3, 7])
        else:
            msg.receiver = rng.choice([0, 1, 2, 7])
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_wrong_party(self, kind: str) -> FuzzCase:
        rng = self.rng
        msg, payload = self._pb(self.valid())
        if rng.random() < 0.5:  # another sender than the certificate names
            msg.sender_id, msg.sender = rng.choice([("retailer", 2), ("arbiter", 3), ("eve", 1)])
        else:  # another receiver
            msg.receiver_id, msg.receiver = rng.choice([("bank", 1), ("retailer", 2)])
        self._fresh(msg)
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_replay(self, kind: str) -> FuzzCase:
        """A different envelope under a sequence number or step already used."""
        rng = self.rng
        msg, payload = self._pb(self.valid())
        msg.seq = rng.choice([0, self.seq - rng.randint(0, 50)])
        return FuzzCase(kind, msg.SerializeToString(), payload)

    def _m_unknown_fields(self, kind: str) -> FuzzCase:
        header, payload = encode(self.valid())
        extra = bytes([0xF8, 0x07]) + bytes([self.rng.randrange(128)])  # field 127, varint
        return FuzzCase(kind, header + extra, payload)

    # frame level: gRPC only
    def _m_frame_garbage(self, kind: str) -> FuzzCase:
        rng = self.rng
        junk = rng.randbytes(rng.randint(0, 200))
        return FuzzCase(kind, deliver_frame=junk, frames=[junk])

    def _m_frame_lies(self, kind: str) -> FuzzCase:
        rng = self.rng
        header, payload = encode(self.valid())
        declared = rng.choice([0, len(payload) + 1, max(len(payload) - 1, 0), 2**63, 2**64 - 1])
        first = pb.Frame(header=header, payload_size=declared).SerializeToString()
        chunks = [payload] if rng.random() < 0.5 else [payload, rng.randbytes(3)]
        deliver = pb.Frame(header=header, payload_size=declared, payload=payload)
        return FuzzCase(kind, header, payload, [first, *chunks], deliver.SerializeToString())

    def _m_stream_shapes(self, kind: str) -> FuzzCase:
        rng = self.rng
        header, payload = encode(self.valid())
        first = pb.Frame(header=header, payload_size=len(payload)).SerializeToString()
        frames = rng.choice(
            [
                [],  # no header frame at all
                [first],  # header, then the stream ends
                [first, payload[: len(payload) // 2]],
                [first, *[payload[i : i + 1] for i in range(len(payload))]],  # 1-byte chunks
                [first, b"", payload],  # an empty chunk
                [pb.Frame(header=header, payload=payload).SerializeToString()],  # inline
            ]
        )
        return FuzzCase(kind, header, payload, frames, None)


MUTATIONS = [
    "valid",
    "bitflip_header",
    "bitflip_payload",
    "truncate_header",
    "truncate_payload",
    "extend_payload",
    "random_header",
    "random_fields",
    "hostile_id",
    "invalid_utf8",
    "huge_ints",
    "wrong_shape",
    "wrong_size",
    "body_data_in_header",
    "bad_json",
    "wrong_tag",
    "wrong_role",
    "wrong_party",
    "replay",
    "unknown_fields",
    "frame_garbage",
    "frame_lies",
    "stream_shapes",
]
FRAME_ONLY = {"frame_garbage", "frame_lies", "stream_shapes"}


def _flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return rng.randbytes(1)
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def decode_outcome(case: FuzzCase) -> str:
    """``accepted``, ``typed:<error>`` or ``untyped:<exception>``."""
    try:
        decode(case.header, case.payload)
    except VflError as exc:
        return f"typed:{type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
        return f"untyped:{type(exc).__name__}"
    return "accepted"


class RawPeer:
    """A gRPC client of one service with a valid peer certificate that sends raw bytes."""

    def __init__(self, *, identity: TlsIdentity, peer_id: str, address: str) -> None:
        self.channel = open_channel(
            peer_id=peer_id, address=address, identity=identity, options=TransportOptions()
        )
        self.deliver = self.channel.unary_unary(DELIVER, response_deserializer=pb.Ack.FromString)
        self.push = self.channel.stream_unary(PUSH, response_deserializer=pb.Ack.FromString)

    def call(self, method: str, request: Any, *, timeout: float) -> str:
        """The status code's name of one call (``OK`` when acknowledged)."""
        try:
            if method == "deliver":
                self.deliver(request, timeout=timeout)
            else:
                self.push(iter(request), timeout=timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
        return "OK"

    def close(self) -> None:
        self.channel.close()


def grpc_requests(case: FuzzCase) -> dict[str, Any]:
    """The Deliver request and the Push frames of a case."""
    deliver = case.deliver_frame
    if deliver is None and case.frames is None:
        deliver = pb.Frame(
            header=case.header, payload_size=len(case.payload), payload=case.payload
        ).SerializeToString()
    frames = case.frames
    if frames is None:
        first = pb.Frame(header=case.header, payload_size=len(case.payload)).SerializeToString()
        frames = [first, case.payload] if case.payload else [first]
    out: dict[str, Any] = {"push": frames}
    if deliver is not None:
        out["deliver"] = deliver
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def count_in_log(cluster: LocalCluster, party: str, needle: str) -> int:
    return cluster.log(party).count(needle)


def fuzz_envelopes(
    cluster: LocalCluster, *, cases: int, seed: int, warm_up: int = 100, settle_s: float = 2.0
) -> dict[str, Any]:
    """Section ``fuzz_envelopes`` (see the module docstring); ``warm_up`` valid envelopes
    first, and ``settle_s`` s before each memory reading."""
    corpus = Corpus(seed)
    arbiter = cluster.configs["arbiter"]
    peer = RawPeer(
        identity=cluster.configs["bank"].tls.load(),
        peer_id="arbiter",
        address=service_address(arbiter),
    )
    pid = cluster.procs["arbiter"].pid
    crashes_before = count_in_log(cluster, "arbiter", "handler for ")
    internal_before = count_in_log(cluster, "arbiter", "internal error while serving")
    try:
        for _ in range(warm_up):  # the channel, the mailbox, the replay journal
            case = FuzzCase("valid", *encode(corpus.valid()))
            peer.call("deliver", grpc_requests(case)["deliver"], timeout=60)
        time.sleep(settle_s)
        rss_before = rss_mb(pid)
        kinds: Counter[str] = Counter()
        decoded: Counter[str] = Counter()
        statuses: dict[str, Counter[str]] = {"deliver": Counter(), "push": Counter()}
        untyped: list[dict[str, str]] = []
        started = time.monotonic()
        for _ in range(cases):
            case = corpus.case()
            kinds[case.kind] += 1
            if case.kind not in FRAME_ONLY:
                outcome = decode_outcome(case)
                decoded[outcome.split(":")[0]] += 1
                if outcome.startswith("untyped"):
                    untyped.append({"path": "decode", "kind": case.kind, "error": outcome})
            for method, request in grpc_requests(case).items():
                code = peer.call(method, request, timeout=60)
                statuses[method][code] += 1
                if code in ("INTERNAL", "UNKNOWN"):
                    untyped.append({"path": method, "kind": case.kind, "error": code})
        seconds = time.monotonic() - started
        gc.collect()
        time.sleep(settle_s)  # handlers still answering the last valid envelopes
        rss_after = rss_mb(pid)
        alive = bool(admin_call(arbiter, "status", timeout=60))
    finally:
        peer.close()
    handler_crashes = count_in_log(cluster, "arbiter", "handler for ") - crashes_before
    internal = count_in_log(cluster, "arbiter", "internal error while serving") - internal_before
    growth = rss_after - rss_before
    return {
        "cases": cases,
        "seed": seed,
        "mutations": dict(sorted(kinds.items())),
        "decode": dict(sorted(decoded.items())),
        "grpc_status": {m: dict(sorted(c.items())) for m, c in statuses.items()},
        "rpcs": sum(sum(c.values()) for c in statuses.values()),
        "untyped_errors": len(untyped),
        "untyped_examples": untyped[:20],
        "handler_crashes": handler_crashes,
        "internal_errors_logged": internal,
        "receiver_alive_after": alive,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(growth, 1),
        "seconds": round(seconds, 1),
        "targets": {"untyped_errors": 0, "rss_growth_mb_below": TARGET_RSS_MB},
        "pass": not untyped and growth < TARGET_RSS_MB and alive,
    }


# -- stalled_streams ---------------------------------------------------------------------


class StalledStreams:
    """``count`` Push calls to a service that send a frame header announcing ``declared``
    payload bytes, then nothing, until :meth:`release`."""

    def __init__(self, peer: RawPeer, *, count: int, job_id: str = "stall-0") -> None:
        self._release = threading.Event()
        self._sent = threading.Semaphore(0)
        self.futures: list[Any] = []
        for i in range(count):
            envelope = Envelope(
                job_id=job_id,
                sender=BANK,
                receiver=ARBITER,
                tag=SplitTag.STEP_ACK,
                step=i,
                seq=time.time_ns() // 1000 + i,
                body=CipherBlock(b"\x00" * 4096, shape=(64,)),
            )
            header, _ = encode(envelope)
            first = pb.Frame(header=header, payload_size=1 << 20).SerializeToString()
            self.futures.append(peer.push.future(self._frames(first), timeout=3600))

    def _frames(self, first: bytes) -> Iterator[bytes]:
        yield first
        self._sent.release()
        self._release.wait()

    def wait_sent(self, timeout: float) -> int:
        """How many streams sent their header within ``timeout`` s."""
        sent, give_up = 0, time.monotonic() + timeout
        while sent < len(self.futures) and self._sent.acquire(
            timeout=max(0.0, give_up - time.monotonic())
        ):
            sent += 1
        return sent

    def release(self) -> list[str]:
        """End every stream; the status each ended with."""
        self._release.set()
        for future in self.futures:
            future.cancel()
        codes = []
        for future in self.futures:
            try:
                future.result(timeout=60)
                codes.append("OK")
            except grpc.FutureCancelledError:
                codes.append("CANCELLED")
            except grpc.RpcError as err:
                codes.append(str(err.code().name))
            except grpc.FutureTimeoutError:
                codes.append("TIMEOUT")
        return codes


class HonestSender:
    """The retailer's small envelopes to the arbiter (stored for a job nobody reads), each
    with a fresh sequence number, timed one by one."""

    def __init__(self, cluster: LocalCluster, *, job_id: str = "stall-honest") -> None:
        self.peer = RawPeer(
            identity=cluster.configs["retailer"].tls.load(),
            peer_id="arbiter",
            address=service_address(cluster.configs["arbiter"]),
        )
        self.job_id = job_id
        self.seq = time.time_ns() // 1000
        self.step = 0

    def send(self, *, deadline: float) -> tuple[str, float]:
        """One envelope: the status and milliseconds until it was acknowledged."""
        self.seq += 1
        self.step += 1
        envelope = Envelope(
            job_id=self.job_id,
            sender=RETAILER,
            receiver=ARBITER,
            tag=SplitTag.STEP_ACK,
            step=self.step,
            seq=self.seq,
            body=ControlBlock.from_obj({"step": self.step}),
        )
        header, payload = encode(envelope)
        frame = pb.Frame(header=header, payload_size=len(payload), payload=payload)
        started = time.perf_counter()
        code = self.peer.call("deliver", frame.SerializeToString(), timeout=deadline)
        return code, 1e3 * (time.perf_counter() - started)

    def series(self, count: int, *, deadline: float, give_up_after: int = 5) -> dict[str, Any]:
        """``count`` envelopes one after the other; stops after ``give_up_after`` misses in
        a row (a missed envelope counts at the deadline)."""
        times: list[float] = []
        codes: Counter[str] = Counter()
        missed_in_row = 0
        for _ in range(count):
            code, ms = self.send(deadline=deadline)
            codes[code] += 1
            times.append(ms if code == "OK" else 1e3 * deadline)
            missed_in_row = 0 if code == "OK" else missed_in_row + 1
            if missed_in_row >= give_up_after:
                break
        return {"times_ms": times, "codes": dict(codes), "delivered": codes["OK"]}

    def close(self) -> None:
        self.peer.close()


def stalled_streams(
    cluster: LocalCluster, *, streams: int, honest: int, deadline: float
) -> dict[str, Any]:
    """Section ``stalled_streams`` (see the module docstring)."""
    sender = HonestSender(cluster)
    staller = RawPeer(
        identity=cluster.configs["bank"].tls.load(),
        peer_id="arbiter",
        address=service_address(cluster.configs["arbiter"]),
    )
    try:
        sender.series(10, deadline=60)  # warm up the channel
        unloaded = sender.series(honest, deadline=60)
        stalls = StalledStreams(staller, count=streams)
        opened = stalls.wait_sent(60)
        time.sleep(1.0)  # let the server take the streams up
        try:
            loaded = sender.series(honest, deadline=deadline)
        finally:
            ended = stalls.release()
        after = sender.series(5, deadline=60)
    finally:
        sender.close()
        staller.close()
    unloaded_p99 = p99(unloaded["times_ms"])
    loaded_p99 = p99(loaded["times_ms"])
    missed = len(loaded["times_ms"]) - loaded["delivered"]
    return {
        "stalled_streams": streams,
        "streams_sent_header": opened,
        "stalling_peer": "bank",
        "honest_peer": "retailer",
        "receiver": "arbiter",
        "honest_per_phase": honest,
        "honest_deadline_s": deadline,
        "unloaded_p99_ms": round(unloaded_p99, 1),
        "unloaded_median_ms": round(statistics.median(unloaded["times_ms"]), 2),
        "stalled_streams_honest_p99_ms": round(loaded_p99, 1),
        "stalled_median_ms": round(statistics.median(loaded["times_ms"]), 2),
        "honest_sent_while_stalled": len(loaded["times_ms"]),
        "honest_delivered_while_stalled": loaded["delivered"],
        "honest_missed": missed,
        "honest_codes_while_stalled": loaded["codes"],
        "stalled_stream_endings": dict(Counter(ended)),
        "recovered": after["delivered"] == 5,
        "ratio": round(loaded_p99 / unloaded_p99, 2),
        "targets": {"stalled_p99_at_most_x_unloaded": TARGET_STALL_RATIO, "honest_missed": 0},
        "pass": missed == 0 and loaded_p99 <= TARGET_STALL_RATIO * unloaded_p99,
    }


# -- kill_trials -------------------------------------------------------------------------


def kill_trial(
    cluster: LocalCluster,
    *,
    job_id: str,
    party: str,
    reference: dict[str, Any],
    timeout: float,
    delay_s: float = 0.0,
    hold_at_step: int | None = None,
) -> dict[str, Any]:
    """Submit the job, SIGKILL ``party`` ``delay_s`` s later (or, with ``hold_at_step``,
    once the guest holds the job after that step: a kill certain to land mid-job, for the
    tests), start it again and wait for the job; compare with ``reference``."""
    started = time.monotonic()
    admin_call(cluster.configs["bank"], "train", small_job(job_id, hold_at_step=hold_at_step))
    if hold_at_step is None:
        time.sleep(max(0.0, delay_s - (time.monotonic() - started)))
    else:
        cluster.wait(job_id, lambda s: s.get("phase") == "held", timeout=timeout)
    before = cluster.job(job_id)
    code = cluster.signal(party, signal.SIGKILL)
    killed_at = time.monotonic() - started
    cluster.restart(party)
    restarted_s = time.monotonic() - started - killed_at
    if hold_at_step is not None:
        admin_call(cluster.configs["bank"], "release", {"job_id": job_id})
    state = cluster.wait(
        job_id, lambda s: s.get("state") in ("done", "failed"), timeout=timeout, every=0.5
    )
    wall = time.monotonic() - started
    events = [r["event"] for r in cluster.audit("bank") if r["job_id"] == job_id]
    finished = events.count("job_finished")
    identical = False
    if state.get("state") == "done":
        got = result_of(cluster, job_id)
        identical = (
            got["test_scores"] == reference["test_scores"]
            and got["history"] == reference["history"]
        )
    ok = state.get("state") == "done" and finished == 1 and "job_failed" not in events
    return {
        "job_id": job_id,
        "party": party,
        "killed_at_s": round(killed_at, 2),
        "mid_job": before.get("state") == "running",
        "step_at_kill": before.get("step", 0),
        "exit_code": code,
        "restart_s": round(restarted_s, 1),
        "wall_s": round(wall, 1),
        "state": state.get("state"),
        "runs": events.count("job_retried") + 1,
        "job_finished_records": finished,
        "identical": identical,
        "lost_or_duplicated": not ok or not identical,
        "error": state.get("error"),
    }


def kill_trials(cluster: LocalCluster, *, trials: int, seed: int, key_bits: int) -> dict[str, Any]:
    """Section ``kill_trials`` (see the module docstring)."""
    rng = random.Random(seed)
    first, _ = reference_run(cluster, "kill-ref-0")  # warms the services' worker pools
    reference, ref_s = reference_run(cluster, "kill-ref")
    if first["test_scores"] != reference["test_scores"]:
        raise SystemExit("two uninterrupted runs of the job disagree: nothing to compare with")
    rows = []
    for i in range(trials):
        party = rng.choice(["bank", "retailer", "arbiter"])
        delay = rng.uniform(0.02, 0.9) * ref_s
        row = kill_trial(
            cluster,
            job_id=f"kill-{i}",
            party=party,
            delay_s=delay,
            reference=reference,
            timeout=max(1800.0, 30 * ref_s),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    identical = sum(r["identical"] for r in rows)
    lost = sum(r["lost_or_duplicated"] for r in rows)
    return {
        "trials": trials,
        "seed": seed,
        "key_bits": key_bits,
        "test_key": key_bits < 2048,
        "job": "breast (569 rows), 2 epochs, batch 64, d = k = 4, protect none, fixed seeds",
        "reference_s": round(ref_s, 1),
        "parties_killed": dict(Counter(r["party"] for r in rows)),
        "killed_mid_job": sum(r["mid_job"] for r in rows),
        "kill_results_identical": identical,
        "lost_or_duplicated": lost,
        "trial_wall_s": spread([r["wall_s"] for r in rows]),
        "restart_s": spread([r["restart_s"] for r in rows]),
        "runs_per_trial": spread([float(r["runs"]) for r in rows], digits=0),
        "targets": {"kill_results_identical": trials, "lost_or_duplicated": 0},
        "pass": identical == trials and lost == 0,
        "rows": rows,
    }


# -- disk_full_trials --------------------------------------------------------------------


def check_folder(folder: Path) -> list[str]:
    """Files under ``folder`` that no longer parse: JSON, JSON lines (a torn last line of
    an append-only log is allowed: it is cut when the file is next read), checkpoints and
    model folders."""
    broken = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.name == "filler":
            continue
        rel = str(path.relative_to(folder))
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".jsonl", ".log"):
                lines = path.read_bytes().split(b"\n")
                for line in lines[:-1]:  # the text after the last newline may be torn
                    if line.strip():
                        json.loads(line)
        except (OSError, ValueError) as exc:
            broken.append(f"{rel}: {type(exc).__name__}")
    for state in sorted(folder.rglob("state.json")):
        parent = state.parent
        if parent.name.startswith("."):
            continue
        try:
            ckpt.read_folder(parent)
        except (OSError, ValueError, KeyError) as exc:
            broken.append(f"{parent.relative_to(folder)}: {type(exc).__name__}")
    return broken


def fill(folder: Path) -> int:
    """Write ``folder/filler`` until the file system is full; its size in bytes."""
    written = 0
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 16, 4096, 512, 1):  # then what is left of the last page
            with contextlib.suppress(OSError):
                while True:
                    n = os.write(fd, b"\0" * block)
                    if n <= 0:
                        break
                    written += n
    finally:
        os.close(fd)
    return written


def disk_full_trial(
    root: Path, *, party: str, key_bits: int, tmpfs_kib: int, timeout: float
) -> dict[str, Any]:
    """One trial (see the module docstring): ``party``'s state folder on a tmpfs."""
    mount: Path | None = None

    def on_tmpfs(paths: dict[str, Path]) -> None:
        nonlocal mount
        mount = paths[party].parent / "state" / party
        mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={tmpfs_kib}k,mode=0700", "tmpfs", str(mount)],
            check=True,
        )

    row: dict[str, Any] = {"party": party, "tmpfs_kib": tmpfs_kib}
    cluster = start_cluster(root, key_bits=key_bits, before_start=on_tmpfs)
    assert mount is not None
    folder = cluster.configs[party].state_dir
    try:
        run_psi(cluster)
        reference, ref_s = reference_run(cluster, "disk-ref")
        row["reference_s"] = round(ref_s, 1)
        job_id = f"disk-{party}"
        bank = cluster.configs["bank"]
        admin_call(bank, "train", small_job(job_id, hold_at_step=3))
        cluster.wait(job_id, lambda s: s.get("phase") == "held", timeout=timeout)
        usage = shutil.disk_usage(folder)
        row["used_before_fill_kib"] = usage.used // 1024
        row["filler_bytes"] = fill(folder)
        admin_call(bank, "release", {"job_id": job_id})
        full_at = time.monotonic()
        needle = f"no space left in {folder}"
        give_up = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < give_up:
            status = cluster.job(job_id)
            if status.get("phase") == "waiting_for_space" and needle in cluster.log(party):
                break
            if status.get("state") in ("done", "failed"):
                break
            time.sleep(0.5)
        row["stopped_s"] = round(time.monotonic() - full_at, 1)
        row["status_when_full"] = {
            k: status.get(k) for k in ("state", "phase", "step", "no_space", "last_error")
        }
        text = str(status.get("no_space") or "")
        row["status_names_the_problem"] = "no space left" in text
        row["status_names_the_folder"] = str(folder) in text
        row["log_names_the_folder"] = needle in cluster.log(party)
        row["stopped_clearly"] = (
            status.get("phase") == "waiting_for_space"
            and row["status_names_the_problem"]
            and row["log_names_the_folder"]
        )
        time.sleep(5.0)  # a few more runs find the folder still full
        row["corrupt_while_full"] = check_folder(folder)
        (folder / "filler").unlink()
        freed = time.monotonic()
        state = cluster.wait(
            job_id, lambda s: s.get("state") in ("done", "failed"), timeout=timeout, every=0.5
        )
        row["resumed_s"] = round(time.monotonic() - freed, 1)
        row["state"] = state.get("state")
        row["identical"] = state.get("state") == "done" and (
            result_of(cluster, job_id)["test_scores"] == reference["test_scores"]
        )
        row["corrupt_after"] = check_folder(folder)
        events = [r["event"] for r in cluster.audit("bank") if r["job_id"] == job_id]
        row["job_finished_records"] = events.count("job_finished")
    finally:
        codes = cluster.stop()
        row["exit_codes"] = codes
        subprocess.run(["umount", str(mount)], check=False)
    row["pass"] = bool(
        row.get("stopped_clearly")
        and not row.get("corrupt_while_full")
        and not row.get("corrupt_after")
        and row.get("identical")
        and row.get("job_finished_records") == 1
    )
    return row


def disk_full_trials(
    root: Path, *, parties: list[str], key_bits: int, tmpfs_kib: int
) -> dict[str, Any]:
    """Section ``disk_full_trials`` (see the module docstring)."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs", "pass": None}
    rows = []
    for party in parties:
        row = disk_full_trial(
            root / f"disk-{party}",
            party=party,
            key_bits=key_bits,
            tmpfs_kib=tmpfs_kib,
            timeout=1800.0,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "trials": len(rows),
        "key_bits": key_bits,
        "tmpfs_kib": tmpfs_kib,
        "how": "job held after step 3, the party's tmpfs filled, job released; filler deleted "
        "once the party reported the full folder",
        "resumed_s": spread([r["resumed_s"] for r in rows if "resumed_s" in r]),
        "passed": sum(bool(r["pass"]) for r in rows),
        "pass": all(r["pass"] for r in rows),
        "rows": rows,
    }


# -- main --------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    seed: int
    fuzz: int
    streams: int
    honest: int
    honest_deadline: float
    kill_trials: int
    key_bits: int
    disk_parties: list[str]
    tmpfs_kib: int
    sections: list[str] = field(default_factory=list)


def run(settings: Settings, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "git_commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": settings.quick,
        "key_bits": settings.key_bits,
        "test_key": settings.key_bits < 2048,
        "cpus": os.cpu_count(),
        "services": "bank, retailer, arbiter: `vfl serve` processes over mutual TLS, loopback",
    }
    if {"fuzz", "stall", "kill"} & set(settings.sections):
        cluster = start_cluster(work / "main", key_bits=settings.key_bits)
        try:
            if "fuzz" in settings.sections:
                out["fuzz_envelopes"] = fuzz_envelopes(
                    cluster, cases=settings.fuzz, seed=settings.seed
                )
                print(json.dumps({"fuzz_envelopes": out["fuzz_envelopes"]}), flush=True)
            if "stall" in settings.sections:
                out["stalled_streams"] = stalled_streams(
                    cluster,
                    streams=settings.streams,
                    honest=settings.honest,
                    deadline=settings.honest_deadline,
                )
                print(json.dumps({"stalled_streams": out["stalled_streams"]}), flush=True)
            if "kill" in settings.sections:
                run_psi(cluster)
                out["kill_trials"] = kill_trials(
                    cluster,
                    trials=settings.kill_trials,
                    seed=settings.seed,
                    key_bits=settings.key_bits,
                )
        finally:
            out["main_services_exit_codes"] = cluster.stop()
    if "disk" in settings.sections:
        out["disk_full_trials"] = disk_full_trials(
            work / "disk",
            parties=settings.disk_parties,
            key_bits=settings.key_bits,
            tmpfs_kib=settings.tmpfs_kib,
        )
    out["pass"] = {
        name: out[name]["pass"]
        for name in ("fuzz_envelopes", "stalled_streams", "kill_trials", "disk_full_trials")
        if name in out
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 512-bit test key")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--fuzz", type=int, help="fuzz cases (default 10,000; quick 1,000)")
    parser.add_argument("--stalled-streams", type=int, default=8)
    parser.add_argument("--honest", type=int, help="honest envelopes per phase (200; quick 50)")
    parser.add_argument("--honest-deadline", type=float, default=5.0)
    parser.add_argument("--kill-trials", type=int, help="default 20; quick 2")
    parser.add_argument("--key-bits", type=int, help="2048 (quick: 512, a test key)")
    parser.add_argument("--disk-parties", default="", help="default bank,retailer,arbiter")
    parser.add_argument("--tmpfs-kib", type=int, default=2048)
    parser.add_argument("--sections", default="fuzz,stall,kill,disk")
    parser.add_argument("--out", type=Path, help=f"default {RESULT.relative_to(ROOT)}")
    parser.add_argument("--work", type=Path, help="keep the services' folders here")
    args = parser.parse_args()
    quick = args.quick
    settings = Settings(
        quick=quick,
        seed=args.seed,
        fuzz=args.fuzz or (1000 if quick else 10000),
        streams=args.stalled_streams,
        honest=args.honest or (50 if quick else 200),
        honest_deadline=args.honest_deadline,
        kill_trials=args.kill_trials if args.kill_trials is not None else (2 if quick else 20),
        key_bits=args.key_bits or (512 if quick else 2048),
        disk_parties=[p for p in args.disk_parties.split(",") if p]
        or (["bank"] if quick else ["bank", "retailer", "arbiter"]),
        tmpfs_kib=args.tmpfs_kib,
        sections=[s for s in args.sections.split(",") if s],
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the services, unmount
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        work = args.work or Path(tmp)
        out = run(settings, work)
    text = json.dumps(out, indent=2) + "\n"
    target = args.out or (None if quick else RESULT)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text.encode())
    print(text)


if __name__ == "__main__":
    main()
