"""Paillier arithmetic on raw gmpy2 integers, fixed-point encoding, slot packing,
obfuscator pools, encrypted tensors and the arbiter's masked decryption (docs/protocol.md §2)."""
