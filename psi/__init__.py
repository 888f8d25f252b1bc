"""Private set intersection for sample alignment (ECDH over X25519); see docs/protocol.md §3."""
