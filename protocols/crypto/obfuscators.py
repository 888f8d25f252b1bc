"""Pre-computed obfuscator pool: ``ρ`` values so an online encryption is one multiplication.

Roles: G and H each keep a pool for the arbiter's public key (A publishes ``h_s`` with
it, §2.1). Generation is data-independent and runs ahead of need in worker processes.

Generators (§4.10 item 1):

1. ``FIXED_BASE`` (default): ``ρ = h_s^x mod n²`` with a fresh uniform ``x`` of
   ``|n| + 128`` bits, from a windowed table of ``h_s`` built once per worker;
2. ``R_POW_N`` (reference): ``ρ = r^n mod n²``, ``r`` uniform in ``Z_n*``;
3. ``SHORT_EXPONENT``: as 1 with a 448-bit ``x``; rests on an extra hardness assumption,
   so it needs ``allow_short_exponent=True`` and logs a warning.

Every ``ρ`` is handed out exactly once: :meth:`ObfuscatorPool.take` removes what it
returns (a reused ``ρ`` would let the arbiter link two ciphertexts).
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from collections import deque
from enum import Enum

import gmpy2
from gmpy2 import mpz

from protocols.crypto.counters import Op, record
from protocols.crypto.fixed_base import FixedBaseTable
from protocols.crypto.paillier import PublicKey
from protocols.errors import InsecureConfigError
from protocols.executor import Executor, split

logger = logging.getLogger(__name__)

HS_WINDOW = 10
SHORT_EXPONENT_BITS = 448
EXPONENT_MARGIN_BITS = 128


class ObfuscatorKind(Enum):
    """How ``ρ`` values are generated."""

    FIXED_BASE = "fixed_base"
    R_POW_N = "r_pow_n"
    SHORT_EXPONENT = "short_exponent"


def exponent_bits(bits: int, kind: ObfuscatorKind) -> int:
    """Length of the random exponent ``x`` for a key of ``bits`` bits."""
    return (
        SHORT_EXPONENT_BITS
        if kind is ObfuscatorKind.SHORT_EXPONENT
        else bits + EXPONENT_MARGIN_BITS
    )


@functools.lru_cache(maxsize=2)
def hs_table(n: mpz, h_s: mpz, exp_bits: int) -> FixedBaseTable:
    """The worker's table for ``h_s`` (built once per process and key)."""
    return FixedBaseTable(h_s, n * n, exp_bits=exp_bits, window=HS_WINDOW)


def generate(n: mpz, h_s: mpz, bits: int, kind: ObfuscatorKind, count: int) -> list[mpz]:
    """Generate ``count`` values in this process (the executor's chunk function)."""
    n2 = n * n
    if kind is ObfuscatorKind.R_POW_N:
        out = []
        for _ in range(count):
            r = mpz(secrets.randbelow(int(n) - 1) + 1)
            out.append(gmpy2.powmod(r, n, n2))
        return out
    exp_bits = exponent_bits(bits, kind)
    table = hs_table(n, h_s, exp_bits)
    return [table.pow(secrets.randbits(exp_bits)) for _ in range(count)]


def _generate_chunk(args: tuple[mpz, mpz, int, str, int]) -> list[mpz]:
    n, h_s, bits, kind, count = args
    return generate(n, h_s, bits, ObfuscatorKind(kind), count)


REFILL_CHUNK = 32


class ObfuscatorPool:
    """A pool of single-use ``ρ`` values for one public key.

    Parameters
    ----------
    key
        The arbiter's public key.
    executor
        Where generation runs.
    kind
        The generator (default fixed-base).
    allow_short_exponent
        Required for :attr:`ObfuscatorKind.SHORT_EXPONENT`.
    """

    def __init__(
        self,
        key: PublicKey,
        *,
        executor: Executor,
        kind: ObfuscatorKind = ObfuscatorKind.FIXED_BASE,
        allow_short_exponent: bool = False,
    ) -> None:
        if kind is ObfuscatorKind.SHORT_EXPONENT:
            if not allow_short_exponent:
                raise InsecureConfigError(
                    "short-exponent obfuscators rest on an extra hardness assumption; "
                    "pass allow_short_exponent=True to use them"
                )
            logger.warning("short-exponent (%d-bit) obfuscators in use", SHORT_EXPONENT_BITS)
        self.key = key
        self.kind = kind
        self._executor = executor
        self._lock = threading.Lock()
        self._values: deque[mpz] = deque()
        self._handed_out = 0
        self._target = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def size(self) -> int:
        """Values ready to be taken."""
        with self._lock:
            return len(self._values)

    @property
    def handed_out(self) -> int:
        """Values taken so far (each exactly once)."""
        with self._lock:
            return self._handed_out

    def fill(self, count: int) -> None:
        """Generate ``count`` more values now, spread over the executor's workers."""
        if count <= 0:
            return
        k = self.key
        chunks = [
            (k.n, k.h_s, k.bits, self.kind.value, len(r))
            for r in split(count, self._executor.workers)
        ]
        for values in self._executor.map(_generate_chunk, chunks):
            with self._lock:
                self._values.extend(values)

    def take(self, count: int) -> list[mpz]:
        """Remove and return ``count`` values, generating any shortfall on the spot."""
        with self._lock:
            missing = count - len(self._values)
        if missing > 0:
            logger.info("obfuscator pool short by %d; generating online", missing)
            self.fill(missing)
        with self._lock:
            out = [self._values.popleft() for _ in range(count)]
            self._handed_out += count
        record(Op.OBFUSCATORS, count)
        self._wake.set()
        return out

    def keep_filled(self, target: int) -> None:
        """Keep at least ``target`` values ready, generating in a background thread."""
        with self._lock:
            self._target = target
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._refill_loop, name="obfuscator-pool", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _refill_loop(self) -> None:
        """Top up in rounds of ``REFILL_CHUNK`` values per worker (≈ 40 ms each at 2048 bits),
        so a protocol step's own work never queues behind a long generation task."""
        while not self._stop.is_set():
            with self._lock:
                deficit = self._target - len(self._values)
            if deficit <= 0:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.fill(min(deficit, REFILL_CHUNK * self._executor.workers))
            except Exception:  # keep the party alive; take() generates online instead
                logger.exception("background obfuscator generation failed")
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop background generation."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class PlaintextPool(ObfuscatorPool):
    """The pool of a plaintext experiment: ``ρ = 1``, nothing generated (nothing is hidden)."""

    def fill(self, count: int) -> None:
        """Nothing to generate."""

    def take(self, count: int) -> list[mpz]:
        """``count`` ones."""
        return [mpz(1)] * count

    def keep_filled(self, target: int) -> None:
        """Nothing to keep."""
