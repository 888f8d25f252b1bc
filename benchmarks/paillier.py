"""Paillier engine benchmark at 2048 bits, everything measured in the same run.

Figures (one process unless stated):

* ``raw_rn_per_s``: ``gmpy2.powmod(r, n, n²)`` with fresh ``r`` (the reference);
* ``pooled_obfuscator_per_s``: one worker's fixed-base generation rate, its table build
  amortised over ``--pool-count`` values; ``obfuscator_speedup`` = ratio (target >= 6);
* ``online_encrypt_per_s``: encryption given a pooled obfuscator (target >= 50,000);
* ``decrypt_per_s``; ``decrypt_vs_floor`` = time of the decryption's two half-size
  powmods measured directly / time of one decryption (target >= 0.9);
* ``packed_matmul_s``: the F1 product of §4.4 for B=256, d=16, k=16 with this engine
  (P1, packed: encrypt ``[[W^G]]``, ``â ⊙ [[W^G]]``, plaintext addend, obfuscation);
  ``phe_matmul_s``: the same product with phe's ``EncryptedNumber`` API (encrypting W,
  float products, sums and ``ciphertext()`` of every result), timed on ``--phe-rows``
  rows and scaled to B; ``matmul_speedup`` = ratio (target >= 30).

Writes ``benchmarks/results/paillier.json``. Usage: ``python -m benchmarks.paillier``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import time
from pathlib import Path

import gmpy2
import numpy as np
from gmpy2 import mpz

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.fixedpoint import FixedPointConfig, encode
from protocols.crypto.obfuscators import (
    HS_WINDOW,
    ObfuscatorKind,
    ObfuscatorPool,
    exponent_bits,
    generate,
    hs_table,
)
from protocols.crypto.packing import capacity, pack_rows, slot_bits_for
from protocols.crypto.paillier import generate_keypair
from protocols.crypto.tensor import encrypt, plain_matmul
from protocols.envelope import Packing
from protocols.executor import InlineExecutor, LocalProcessExecutor
from protocols.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]

RESULT = ROOT / "benchmarks" / "results" / "paillier.json"


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument(
        "--pool-count", type=int, default=10_000, help="values one worker's table is amortised over"
    )
    parser.add_argument("--phe-rows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    pk, sk = generate_keypair(bits=args.bits)
    n, n2 = pk.n, pk.n2

    # -- obfuscators ------------------------------------------------------------
    rs = [mpz(secrets.randbelow(int(n) - 1) + 1) for _ in range(60)]
    raw_rn = len(rs) / timed(lambda: [gmpy2.powmod(r, n, n2) for r in rs])
    exp_bits = exponent_bits(pk.bits, ObfuscatorKind.FIXED_BASE)
    hs_table.cache_clear()
    t = time.perf_counter()
    hs_table(n, pk.h_s, exp_bits)
    table_build_s = time.perf_counter() - t
    sample = 600
    per_value_s = (
        timed(lambda: generate(n, pk.h_s, pk.bits, ObfuscatorKind.FIXED_BASE, sample)) / sample
    )
    pooled = args.pool_count / (table_build_s + args.pool_count * per_value_s)

    # -- online encryption, decryption -------------------------------------------
    rhos = generate(n, pk.h_s, pk.bits, ObfuscatorKind.FIXED_BASE, 2000)
    ms = [secrets.randbelow(2**100) - 2**99 for _ in range(2000)]
    enc_s = timed(lambda: [pk.encrypt(m, r) for m, r in zip(ms, rhos, strict=True)], 5)
    online_encrypt = len(ms) / enc_s
    cts = [pk.encrypt(m, r) for m, r in zip(ms[:300], rhos[:300], strict=True)]
    dec_s = timed(lambda: [sk.decrypt(c) for c in cts], 5) / len(cts)
    floor_s = timed(lambda: [sk.half_powmods(c) for c in cts], 5) / len(cts)
    assert all(sk.decrypt(c) == m % n for c, m in zip(cts, ms, strict=False))

    # -- F1 product: this engine (P1, packed) vs phe ------------------------------
    batch, d, k = 256, 16, 16
    cfg = FixedPointConfig()
    s = slot_bits_for(d=d, k=k, batch=batch)
    slots = capacity(pk.bits, s)
    rng = np.random.default_rng(0)
    alpha = rng.uniform(-1, 1, size=(batch, d))
    w_real = rng.normal(0, 0.3, size=(d, k))
    a_hat = encode(alpha, scale=cfg.f_a, bound=cfg.a_max)
    l_bits = 127
    e_share = np.array(
        [[secrets.randbelow(2**l_bits) - 2 ** (l_bits - 1) for _ in range(k)] for _ in range(d)],
        dtype=object,
    )
    wg_share = encode(w_real, scale=cfg.f_w, bound=cfg.w_max) - e_share
    cipher = PaillierCipher(pk)
    packing = Packing(slot_bits=s, slots=slots, axis=1)
    inline = InlineExecutor()
    pool = ObfuscatorPool(pk, executor=inline)
    blocks = -(-k // slots)
    per_run = d * blocks + batch * blocks

    def engine_f1(executor) -> None:  # type: ignore[no-untyped-def]
        cw = encrypt(
            cipher,
            pack_rows(wg_share, slot_bits=s, slots=slots),
            pool=pool,
            scale=cfg.f_w,
            packing=packing,
        )
        z = plain_matmul(a_hat, cw, executor=executor, scale=cfg.f_z)
        z.add_plain(pack_rows(a_hat.dot(e_share), slot_bits=s, slots=slots)).obfuscate(pool)

    pool.fill(per_run * 8)  # offline, as in a job: the pool is filled ahead of need
    packed_s = timed(lambda: engine_f1(inline))
    with LocalProcessExecutor(workers=2) as two:
        engine_f1(two)  # warm the worker processes
        packed_2proc_s = timed(lambda: engine_f1(two))

    from phe import paillier as phe_paillier

    phe_pk = phe_paillier.PaillierPublicKey(int(n))
    t = time.perf_counter()
    enc_w = [[phe_pk.encrypt(float(w_real[i, j])) for j in range(k)] for i in range(d)]
    phe_encrypt_s = time.perf_counter() - t
    t = time.perf_counter()
    for b in range(args.phe_rows):
        for j in range(k):
            acc = enc_w[0][j] * float(alpha[b, 0])
            for i in range(1, d):
                acc = acc + enc_w[i][j] * float(alpha[b, i])
            acc.ciphertext()
    phe_rows_s = time.perf_counter() - t
    phe_s = phe_encrypt_s + phe_rows_s * batch / args.phe_rows

    result = {
        "bits": pk.bits,
        "raw_rn_per_s": round(raw_rn, 1),
        "pooled_obfuscator_per_s": round(pooled, 1),
        "obfuscator_speedup": round(pooled / raw_rn, 2),
        "obfuscator_table_build_s": round(table_build_s, 3),
        "obfuscator_per_value_ms": round(per_value_s * 1e3, 4),
        "obfuscator_window_bits": HS_WINDOW,
        "obfuscator_amortised_over": args.pool_count,
        "online_encrypt_per_s": round(online_encrypt, 1),
        "decrypt_per_s": round(1 / dec_s, 1),
        "decrypt_floor_per_s": round(1 / floor_s, 1),
        "decrypt_vs_floor": round(floor_s / dec_s, 3),
        "packed_matmul_s": round(packed_s, 4),
        "packed_matmul_2proc_s": round(packed_2proc_s, 4),
        "phe_matmul_s": round(phe_s, 2),
        "phe_timed_rows": args.phe_rows,
        "phe_encrypt_w_s": round(phe_encrypt_s, 3),
        "matmul_speedup": round(phe_s / packed_s, 1),
        "matmul_shape": {"B": batch, "d": d, "k": k, "slot_bits": s, "slots": slots},
        "targets": {
            "obfuscator_speedup": 6,
            "online_encrypt_per_s": 50_000,
            "decrypt_vs_floor": 0.9,
            "matmul_speedup": 30,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gmpy2": gmpy2.version(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
