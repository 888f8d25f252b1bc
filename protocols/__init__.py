"""How parties talk securely: envelopes, transport, TLS (and later Paillier, masks, secure aggregation)."""
