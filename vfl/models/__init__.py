"""Plain torch models. They never see channels or ciphertexts; besides the standard library
this package imports only torch."""

from vfl.models.mlp import MLP
from vfl.models.split import BottomModel, OutputBound, Task, TopModel, loss_for

__all__ = ["MLP", "BottomModel", "OutputBound", "Task", "TopModel", "loss_for"]
