"""Plain torch models. They never see channels or ciphertexts; besides the standard library
this package imports only torch."""

from vfl.models.mlp import MLP
from vfl.models.split import (
    BottomModel,
    ClassWeight,
    LossKind,
    OutputBound,
    Task,
    TopModel,
    binary_loss,
    loss_for,
)

__all__ = [
    "MLP",
    "BottomModel",
    "ClassWeight",
    "LossKind",
    "OutputBound",
    "Task",
    "TopModel",
    "binary_loss",
    "loss_for",
]
