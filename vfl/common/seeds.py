"""Reproducible runs whose random draws nobody else can predict (docs/protocol.md §4.4.2).

A party's random draws in a job (the guest's batch order, its W_0 component, its label
protection noise and ``rr_labels`` seed; the host's model initialisation, its W_0 component
and its embedding noise) come either from the OS CSPRNG or, to rerun a job bit for bit, from
a **seed**: the guest's job ``seed`` (never sent), a party's ``[random] seed``. A seed is
something an operator writes down (``7``), so it is never used as it is: every draw is keyed
by HMAC-SHA256 under the party's **local secret** (32 random bytes made at first use in
``<state_dir>/seed.key``, owner-only) and the draw's purpose. So the same seed at the same
installation gives the same draws, and a peer that guesses the seed still cannot compute
the noise or the weights that protect what it must not learn. Rerunning a job elsewhere
needs a copy of that file (it is part of the party's backup, like its keys).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocols.errors import ConfigError
from protocols.files import atomic_write, private_dir

SECRET_FILE = "seed.key"  # noqa: S105 - a file name, not a password
_SECRET_BYTES = 32


def local_secret(state_dir: Path) -> bytes:
    """This party's local secret, made (owner-only) the first time it is needed.

    Made with an exclusive create, so two first uses at once agree on one secret; a file that
    others may read is refused (it would let them compute this party's draws).
    """
    path = state_dir / SECRET_FILE
    if not path.exists():
        private_dir(state_dir)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another first use won: read its secret
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(_SECRET_BYTES))
                out.flush()
                os.fsync(out.fileno())
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            f"{path} may be read by others; make it owner-only (chmod 600 {path}): it keys "
            "this party's seeded draws"
        )
    data = path.read_bytes()
    if len(data) != _SECRET_BYTES:
        raise ConfigError(
            f"{path} is not a {_SECRET_BYTES}-byte secret; restore it from the backup, or delete "
            "it to make a new one (earlier seeded runs can then no longer be repeated)"
        )
    return data


def simulation_secret(state_dir: Path, *, seed: int) -> None:
    """Give a simulation's fresh state folder a local secret derived from its ``seed``.

    Only for every party simulated in one process (:mod:`vfl.simulate`, tests): there is no
    peer to keep the draws from, and the same seed must repeat a simulation in a new
    temporary folder. A real party's secret is random (:func:`local_secret`).
    """
    path = state_dir / SECRET_FILE
    if not path.exists():
        private_dir(state_dir)
        digest = hashlib.sha256(f"vfl-simulation-secret|{seed}".encode()).digest()
        atomic_write(path, digest, mode=0o600)


def fresh_seed() -> int:
    """A new seed for a run that names none (recorded, so the run can be repeated)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class RunSeeds:
    """Every keyed draw of one party's run: ``seed`` under its local ``secret``, within
    ``scope`` (what the job is, :func:`job_scope`: another job draws otherwise)."""

    seed: int
    secret: bytes
    scope: str = ""

    @classmethod
    def at(cls, state_dir: Path, seed: int, *, scope: str = "") -> RunSeeds:
        """The draws of ``seed`` for ``scope`` at the party whose state folder is
        ``state_dir``."""
        if seed < 0:
            raise ConfigError(f"seed {seed} must be a non-negative integer")
        return cls(seed=seed, secret=local_secret(state_dir), scope=scope)

    def digest(self, purpose: str) -> bytes:
        """32 bytes for ``purpose`` (e.g. ``"batch-order"``)."""
        message = f"vfl-seed|{self.seed}|{self.scope}|{purpose}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def integer(self, purpose: str, *, bits: int = 63) -> int:
        """A non-negative integer of ``bits`` bits for ``purpose`` (at most 256)."""
        return int.from_bytes(self.digest(purpose), "big") >> (256 - bits)

    def generator(self, purpose: str) -> np.random.Generator:
        """A numpy generator seeded with 128 bits for ``purpose``."""
        return np.random.Generator(np.random.PCG64(self.integer(purpose, bits=128)))

    def fingerprint(self) -> str:
        """Which local secret was used (its hash's first 16 hex digits; reveals nothing)."""
        return hashlib.sha256(b"vfl-seed-key|" + self.secret).hexdigest()[:16]


def job_scope(job: Mapping[str, Any]) -> str:
    """The scope of a job's draws: the hash of what the job is (``job``: its settings as
    this party sees them, without its id), so the same seed gives different draws in
    different jobs, and the same draws only when the same job is run again (§4.4.2)."""
    text = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
