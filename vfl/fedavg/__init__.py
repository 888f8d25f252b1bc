"""Horizontal federated averaging with secure aggregation (PROTOCOL.md §7)."""
