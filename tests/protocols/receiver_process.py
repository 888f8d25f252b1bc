"""A receiving party in its own process, for the cross-process tests.

Usage: python receiver_process.py PKI_DIR PARTY_ID PEER_ID JOB_ID STEPS
Prints its port, waits for the sender's address on stdin, receives STEPS
envelopes and prints one line per envelope: step, payload size and SHA-256.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport import tls
from protocols.transport.grpc_channel import GrpcChannel
from tests.conftest import PARTIES, TestTag


def main() -> None:
    pki, me_id, peer_id, job_id, steps = (
        Path(sys.argv[1]),
        sys.argv[2],
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    by_id = {p.party_id: p for p in PARTIES}
    me, peer = by_id[me_id], by_id[peer_id]
    identity = tls.load_demo_identity(pki, me_id)
    channel = GrpcChannel(me=me, identity=identity, tags=TagRegistry([TestTag]))
    print(channel.start(), flush=True)
    address = sys.stdin.readline().strip()
    channel.add_peer(PartyAddress(peer, address, (pki / f"{peer_id}.pem").read_bytes()))
    for step in range(steps):
        got = channel.recv(job_id=job_id, sender=peer, tag=TestTag.DATA, step=step, timeout=120)
        print(step, len(got.payload), hashlib.sha256(got.payload).hexdigest(), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
