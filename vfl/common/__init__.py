"""Pieces every mode shares: checkpoints, metrics, job-file reading (no mode imported)."""
