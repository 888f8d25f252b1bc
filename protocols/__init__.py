"""How parties talk securely: envelopes, transport and TLS.

Later issues add Paillier, fixed-point encoding, masks and secure aggregation here.
"""
