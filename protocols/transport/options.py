"""Tunables of the gRPC transport (one frozen dataclass, passed explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True)
class TransportOptions:
    """How envelopes travel.

    Parameters
    ----------
    chunk_bytes
        Payloads up to this size go in one unary call; larger ones are streamed in
        chunks of this size (at most 4 MiB, gRPC's default message limit).
    max_envelope_bytes
        The largest payload a receiver accepts.
    max_queued_bytes
        The most payload bytes a receiver keeps for messages nobody has read yet.
    retry_seconds
        How long a sender keeps retrying a whole envelope after ``UNAVAILABLE`` or a
        lost reply before it gives up.
    base_deadline_seconds, min_bytes_per_second
        Each attempt's deadline is ``base + size / min_bytes_per_second``.
    """

    chunk_bytes: int = 1 * MiB
    max_envelope_bytes: int = 2048 * MiB
    max_queued_bytes: int = 4096 * MiB
    retry_seconds: float = 30.0
    base_deadline_seconds: float = 10.0
    min_bytes_per_second: float = 8 * MiB

    def __post_init__(self) -> None:
        if not 4096 <= self.chunk_bytes <= 4 * MiB:
            raise ConfigError(
                f"transport chunk_bytes={self.chunk_bytes} must lie in [4 KiB, 4 MiB]"
            )
        for name in ("max_envelope_bytes", "max_queued_bytes"):
            if getattr(self, name) < self.chunk_bytes:
                raise ConfigError(f"transport {name} must be at least chunk_bytes")
        for name in ("retry_seconds", "base_deadline_seconds", "min_bytes_per_second"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"transport {name} must be positive")

    def deadline(self, size: int) -> float:
        """The deadline in seconds of one attempt to send ``size`` payload bytes."""
        return self.base_deadline_seconds + size / self.min_bytes_per_second

    @property
    def grpc_message_limit(self) -> int:
        """Largest single gRPC message: one chunk plus room for the header."""
        return self.chunk_bytes + 64 * 1024
