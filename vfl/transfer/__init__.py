"""Federated transfer learning (docs/protocol.md §6)."""
