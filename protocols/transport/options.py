"""Tunables of the gRPC transport (one frozen dataclass, passed explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.errors import ConfigError

MiB = 1 << 20
ENVELOPE_OVERHEAD_BYTES = 1024
"""What a queued envelope costs beyond its payload (header, key, bookkeeping), charged
against ``max_queued_bytes`` so that empty envelopes cannot be queued without limit."""


@dataclass(frozen=True)
class TransportOptions:
    """How envelopes travel.

    Parameters
    ----------
    chunk_bytes
        Payloads up to this size go in one unary call; larger ones are streamed in
        chunks of this size (at most 4 MiB, gRPC's default message limit).
    max_envelope_bytes
        The largest payload a receiver accepts. The default, 64 MiB, is many times the
        protocol's messages at usual sizes (a PSI chunk of 65,536 points is 2 MiB; a P1
        split-NN step with a batch of 1,024 rows and k = 64 is 2.5 MiB of 2048-bit
        ciphertexts); a larger message is refused naming this setting.
    max_queued_bytes
        The most bytes a receiver keeps *per sending peer* for messages nobody has read
        or handled yet: each envelope is charged its header and payload plus
        :data:`ENVELOPE_OVERHEAD_BYTES`, and a body's declared size is reserved before it
        is received. A sender over budget is told the receiver is busy and retries; an
        envelope a local receive is waiting for is always admitted.
    max_calls_per_peer
        The most calls one peer may have open at once; one more is refused as busy (and
        retried) at once, so other peers keep being served.
    server_threads
        Threads serving calls; 0 (default) means ``(peers + 1) * max_calls_per_peer + 4``,
        so that every peer and the party's own operator are served even while one peer
        holds all its calls.
    handler_threads
        Threads running handlers (a service's replies to job submissions, decryption
        requests, pings); each sender may occupy at most half of them.
    stream_idle_seconds
        A call that delivers no bytes for this long is cancelled by the receiver; the
        whole call is cancelled after ``deadline(size) + stream_idle_seconds``.
    stale_mail_seconds
        Unread messages of a job with no local activity for this long (no local protocol
        sent, awaited or read a message of it: an unknown, finished or failed job) are
        dropped.
    retry_seconds
        How long a sender keeps retrying a whole envelope after ``UNAVAILABLE`` or a
        lost reply before it gives up.
    base_deadline_seconds, min_bytes_per_second
        Each attempt's deadline is ``base + size / min_bytes_per_second``.
    """

    chunk_bytes: int = 1 * MiB
    max_envelope_bytes: int = 64 * MiB
    max_queued_bytes: int = 256 * MiB
    max_calls_per_peer: int = 8
    server_threads: int = 0
    handler_threads: int = 8
    stream_idle_seconds: float = 15.0
    stale_mail_seconds: float = 300.0
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
        if self.max_queued_bytes < self.max_envelope_bytes:
            raise ConfigError("transport max_queued_bytes must be at least max_envelope_bytes")
        for name in (
            "retry_seconds",
            "base_deadline_seconds",
            "min_bytes_per_second",
            "stream_idle_seconds",
            "stale_mail_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"transport {name} must be positive")
        for name in ("max_calls_per_peer", "handler_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"transport {name} must be a whole number of at least 1")
        if not isinstance(self.server_threads, int) or self.server_threads < 0:
            raise ConfigError("transport server_threads must be a whole number (0: automatic)")

    def threads_for(self, peers: int) -> int:
        """Server threads for a party with ``peers`` peers (see ``server_threads``)."""
        return self.server_threads or (peers + 1) * self.max_calls_per_peer + 4

    def deadline(self, size: int) -> float:
        """The deadline in seconds of one attempt to send ``size`` payload bytes."""
        return self.base_deadline_seconds + size / self.min_bytes_per_second

    def server_deadline(self, size: int) -> float:
        """How long the receiver lets a call declaring ``size`` bytes last."""
        return self.deadline(size) + self.stream_idle_seconds

    @property
    def grpc_message_limit(self) -> int:
        """Largest single gRPC message: one chunk plus room for the header."""
        return self.chunk_bytes + 64 * 1024
