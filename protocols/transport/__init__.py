"""Transport: the Channel abstraction with in-memory and gRPC implementations."""

from protocols.transport.base import Channel, DeliveryStatus, MessageFilter
from protocols.transport.options import TransportOptions

__all__ = ["Channel", "DeliveryStatus", "MessageFilter", "TransportOptions"]
