"""Private set intersection for sample alignment (ECDH over X25519); see PROTOCOL.md §3."""
