"""Label protection on the host-bound path, embedding noise (and later DP-SGD)."""
