"""The plain torch parts of the split network (docs/protocol.md §4.1).

* :class:`BottomModel`: a party's feature extractor. The host's must bound its output to
  ``|α| <= A_max`` (``tanh`` scaled to ``A_max``, or ``clamp``) so its embedding can be
  encoded within the fixed-point bounds.
* :class:`TopModel`: the guest's layers after the interactive layer's activation.
* :func:`loss_for`: binary cross-entropy on logits (first-class), cross-entropy for several
  classes, mean squared error for regression; always mean-reduced over the batch.

The interactive layer itself is not here: its host part is secret-shared and lives in the
protocol. These modules never see channels or ciphertexts.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import nn

from vfl.models.mlp import MLP, activation_layer


class OutputBound(StrEnum):
    """How a bottom model's output is bounded."""

    NONE = "none"
    TANH = "tanh"
    CLAMP = "clamp"


class Task(StrEnum):
    """What the top model predicts."""

    BINARY = "binary"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"


class BottomModel(nn.Module):
    """An MLP whose output is optionally bounded to ``±bound``."""

    def __init__(
        self,
        *,
        in_features: int,
        widths: tuple[int, ...],
        activation: str = "relu",
        dropout: float = 0.0,
        output_bound: OutputBound = OutputBound.TANH,
        bound: float = 8.0,
    ) -> None:
        super().__init__()
        if bound <= 0:
            raise ValueError("the output bound must be positive")
        self.mlp = MLP(
            in_features=in_features, widths=widths, activation=activation, dropout=dropout
        )
        self.output_bound = output_bound
        self.bound = bound

    @property
    def out_features(self) -> int:
        """Width of the embedding."""
        last: nn.Linear = self.mlp.net[-1]  # type: ignore[assignment]
        return int(last.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding, bounded as configured."""
        out: torch.Tensor = self.mlp(x)
        if self.output_bound is OutputBound.TANH:
            return self.bound * torch.tanh(out / self.bound)
        if self.output_bound is OutputBound.CLAMP:
            return torch.clamp(out, -self.bound, self.bound)
        return out


class TopModel(nn.Module):
    """Activation of the interactive pre-activation ``z``, then an MLP to the outputs."""

    def __init__(
        self,
        *,
        in_features: int,
        widths: tuple[int, ...],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.act = activation_layer(activation)
        self.mlp = MLP(
            in_features=in_features, widths=widths, activation=activation, dropout=dropout
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Outputs (logits for classification)."""
        out: torch.Tensor = self.mlp(self.act(z))
        return out


def loss_for(task: Task) -> nn.Module:
    """The mean-reduced loss for ``task``."""
    if task is Task.BINARY:
        return nn.BCEWithLogitsLoss(reduction="mean")
    if task is Task.MULTICLASS:
        return nn.CrossEntropyLoss(reduction="mean")
    return nn.MSELoss(reduction="mean")
