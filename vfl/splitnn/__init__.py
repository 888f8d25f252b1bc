"""The encrypted split neural network (docs/protocol.md §4)."""
