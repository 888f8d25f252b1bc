"""Horizontal federated averaging with secure aggregation (docs/protocol.md §7)."""
