"""Paillier arithmetic on raw gmpy2 integers, fixed-point encoding, slot packing,
obfuscator pools, encrypted tensors and the arbiter's masked decryption (PROTOCOL.md §2)."""
