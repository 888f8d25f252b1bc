"""Data loading, validation and alignment."""
