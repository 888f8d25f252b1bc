"""Federated transfer learning (PROTOCOL.md §6)."""
