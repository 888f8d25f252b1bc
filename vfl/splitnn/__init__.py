"""The encrypted split neural network (PROTOCOL.md §4)."""
