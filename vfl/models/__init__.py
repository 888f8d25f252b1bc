"""Plain torch models. They never see channels or ciphertexts; this package imports only torch."""

from vfl.models.mlp import MLP

__all__ = ["MLP"]
