"""Scoring new customers with a trained split-NN model (docs/protocol.md §5)."""
