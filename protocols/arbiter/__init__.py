"""The arbiter A: the Paillier key holder's service and its clients (docs/protocol.md §2.5, §2.6).

Above :mod:`protocols.crypto` (which imports no transport): these modules talk over channels.
"""
