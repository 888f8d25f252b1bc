"""Transport benchmark: the gRPC Channel against bare grpcio, measured in the same run.

Two processes on loopback with the same mutual-TLS credentials:

* ``channel``: a 64 MiB body sent with ``GrpcChannel.send`` (envelope codec, chunked
  Push stream, reassembly with SHA-256 digest, replay check, mailbox) until the
  receiver's channel has accepted it;
* ``bare``: the same 64 MiB as a bare grpcio client-streaming call with the same
  chunk size, whose server only joins the chunks;
* ``small_envelope_rtt_ms``: a small envelope to the receiver, whose handler answers
  with another small envelope (what one split-NN step pays several times).

Runs are interleaved and the medians are reported. Writes
``benchmarks/results/transport.json``. Target: ``ratio >= 0.7``.

Usage: ``python -m benchmarks.transport [--mib 64] [--repeats 7] [--rtt-rounds 300]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path

import grpc

from protocols.envelope import ControlBlock, Envelope, PlainBlock
from protocols.files import atomic_write
from protocols.roles import Party, PartyAddress, Role
from protocols.tags import TagRegistry
from protocols.transport import tls
from protocols.transport.base import MessageFilter
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.options import TransportOptions

ROOT = Path(__file__).resolve().parents[1]

SENDER = Party("bank", Role.GUEST)
RECEIVER = Party("retailer", Role.HOST)
BARE_METHOD = "/bench.Bare/Stream"
RESULT = ROOT / "benchmarks" / "results" / "transport.json"


class BenchTag(StrEnum):
    BULK = "bench.BULK"
    PING = "bench.PING"
    PONG = "bench.PONG"


def identity(pki: Path, party: Party) -> tls.TlsIdentity:
    return tls.load_demo_identity(pki, party.party_id)


def serve(pki: Path, chunk: int) -> None:
    """Receiver process: a GrpcChannel and a bare grpcio server with the same credentials."""
    ident = identity(pki, RECEIVER)
    options = TransportOptions(chunk_bytes=chunk)
    channel = GrpcChannel(
        me=RECEIVER, identity=ident, tags=TagRegistry([BenchTag]), options=options
    )

    def pong(e: Envelope) -> None:
        channel.send(
            Envelope(
                job_id=e.job_id,
                sender=RECEIVER,
                receiver=SENDER,
                tag=BenchTag.PONG,
                step=e.step,
                body=e.body,
            )
        )

    channel.add_handler(MessageFilter.for_tags(BenchTag.PING), pong)
    channel.add_handler(MessageFilter.for_tags(BenchTag.BULK), lambda e: None)  # drop bulk bodies

    def bare(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        body = b"".join(requests)
        return len(body).to_bytes(8, "big")

    server = grpc.server(
        ThreadPoolExecutor(8),
        options=[("grpc.max_receive_message_length", options.grpc_message_limit)],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Bare", {"Stream": grpc.stream_unary_rpc_method_handler(bare)}
            )
        ]
    )
    creds = grpc.ssl_server_credentials(
        [(ident.key_pem, ident.certificate_pem)],
        root_certificates=ident.ca_pem,
        require_client_auth=True,
    )
    bare_port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(channel.start(), bare_port, flush=True)
    sender_address = sys.stdin.readline().strip()
    channel.add_peer(PartyAddress(SENDER, sender_address, (pki / "bank.pem").read_bytes()))
    sys.stdin.readline()  # parent closes stdin when done
    channel.close(grace=1)
    server.stop(1).wait()


def run(args: argparse.Namespace) -> dict[str, object]:
    pki = Path(tempfile.mkdtemp(prefix="vfl-bench-pki-"))
    tls.create_demo_pki(pki, [SENDER, RECEIVER])
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(pki), "--chunk", str(args.chunk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout
    channel_port, bare_port = map(int, proc.stdout.readline().split())
    ident = identity(pki, SENDER)
    options = TransportOptions(chunk_bytes=args.chunk)
    channel = GrpcChannel(me=SENDER, identity=ident, tags=TagRegistry([BenchTag]), options=options)
    channel.start()
    channel.add_peer(
        PartyAddress(RECEIVER, f"127.0.0.1:{channel_port}", (pki / "retailer.pem").read_bytes())
    )
    proc.stdin.write(f"127.0.0.1:{channel.port}\n")
    proc.stdin.flush()

    creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.certificate_pem)
    bare_channel = grpc.secure_channel(
        f"127.0.0.1:{bare_port}",
        creds,
        options=[
            ("grpc.ssl_target_name_override", RECEIVER.party_id),
            ("grpc.max_send_message_length", options.grpc_message_limit),
        ],
    )
    bare_call = bare_channel.stream_unary(BARE_METHOD)
    body = os.urandom(args.mib << 20)

    def bare_once() -> float:
        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), args.chunk):
                yield body[i : i + args.chunk]

        t = time.perf_counter()
        reply = bare_call(chunks(), timeout=120)
        elapsed = time.perf_counter() - t
        assert int.from_bytes(reply, "big") == len(body)
        return elapsed

    step = iter(range(10**9))

    def channel_once() -> float:
        t = time.perf_counter()
        channel.send(
            Envelope(
                job_id="bench",
                sender=SENDER,
                receiver=RECEIVER,
                tag=BenchTag.BULK,
                step=next(step),
                body=PlainBlock(body),
            )
        )
        return time.perf_counter() - t

    bare_once(), channel_once()  # warm up connections
    bare_t, chan_t = [], []
    for _ in range(args.repeats):
        bare_t.append(bare_once())
        chan_t.append(channel_once())

    ping = ControlBlock.from_obj({"step": 0})
    for i in range(20):  # warm up
        channel.send(
            Envelope(
                job_id="rtt-warm",
                sender=SENDER,
                receiver=RECEIVER,
                tag=BenchTag.PING,
                step=i,
                body=ping,
            )
        )
        channel.recv(job_id="rtt-warm", sender=RECEIVER, tag=BenchTag.PONG, step=i, timeout=10)
    rtts = []
    for i in range(args.rtt_rounds):
        t = time.perf_counter()
        channel.send(
            Envelope(
                job_id="rtt", sender=SENDER, receiver=RECEIVER, tag=BenchTag.PING, step=i, body=ping
            )
        )
        channel.recv(job_id="rtt", sender=RECEIVER, tag=BenchTag.PONG, step=i, timeout=10)
        rtts.append(time.perf_counter() - t)

    bare_rtt = []
    for _ in range(args.rtt_rounds):
        t = time.perf_counter()
        bare_call(iter([b"x" * 64]), timeout=10)
        bare_rtt.append(time.perf_counter() - t)

    channel.close(grace=1)
    bare_channel.close()
    proc.stdin.write("done\n")
    proc.stdin.close()
    proc.wait(30)

    mib = args.mib
    chan_rate = mib / statistics.median(chan_t)
    bare_rate = mib / statistics.median(bare_t)
    return {
        "channel_MiB_per_s": round(chan_rate, 1),
        "bare_grpc_MiB_per_s": round(bare_rate, 1),
        "ratio": round(chan_rate / bare_rate, 3),
        "small_envelope_rtt_ms": round(1e3 * statistics.median(rtts), 3),
        "bare_grpc_small_call_ms": round(1e3 * statistics.median(bare_rtt), 3),
        "target_ratio": 0.7,
        "body_MiB": mib,
        "chunk_bytes": args.chunk,
        "repeats": args.repeats,
        "channel_seconds": [round(x, 4) for x in chan_t],
        "bare_seconds": [round(x, 4) for x in bare_t],
        "rtt_rounds": args.rtt_rounds,
        "tls": "mutual TLS, ECDSA P-256 certificates from one demo CA, both measurements",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rtt-rounds", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=TransportOptions().chunk_bytes)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.chunk)
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(
        f"{result['body_MiB']} MiB over mTLS, chunk {result['chunk_bytes']} B, "
        f"median of {result['repeats']}:"
    )
    print(f"  Channel   {result['channel_MiB_per_s']:8.1f} MiB/s")
    print(f"  bare gRPC {result['bare_grpc_MiB_per_s']:8.1f} MiB/s")
    print(f"  ratio     {result['ratio']:8.3f}   (target >= 0.7)")
    print(
        f"  small envelope round trip {result['small_envelope_rtt_ms']:.3f} ms "
        f"(bare gRPC small call {result['bare_grpc_small_call_ms']:.3f} ms)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
