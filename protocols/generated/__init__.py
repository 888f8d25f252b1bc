"""Generated protobuf code (do not edit; see regenerate.py)."""
