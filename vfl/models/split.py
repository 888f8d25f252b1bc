"""The plain torch parts of the split network (docs/protocol.md §4.1).

* :class:`BottomModel`: a party's feature extractor. The host's must bound its output to
  ``|α| <= A_max`` (``tanh`` scaled to ``A_max``, or ``clamp``) so its embedding can be
  encoded within the fixed-point bounds.
* :class:`TopModel`: the guest's layers after the interactive layer's activation.
* :func:`loss_for`: binary cross-entropy on logits (first-class), cross-entropy for several
  classes, mean squared error for regression; always mean-reduced over the batch.
* :func:`binary_loss`: the binary loss for rare positives: BCE or focal loss, with a weight on
  the positive rows; still the mean over the batch.

Empty widths give linear parts: a bottom model with ``widths = ()`` is the identity, a top
model with ``widths = ()`` is neither activation nor layer (the interactive layer's ``z`` is
the output). With all three empty the split network is a vertical logistic regression.

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


class LossKind(StrEnum):
    """The binary loss: cross-entropy, or the focal loss that down-weights easy rows."""

    BCE = "bce"
    FOCAL = "focal"


class ClassWeight(StrEnum):
    """How positive rows are weighted: by ``pos_weight`` as given, or by the class balance."""

    NONE = "none"
    BALANCED = "balanced"


class BottomModel(nn.Module):
    """An MLP whose output is optionally bounded to ``±bound`` (``widths = ()``: the identity,
    bounded the same way)."""

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
        return self.mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding, bounded as configured."""
        out: torch.Tensor = self.mlp(x)
        if self.output_bound is OutputBound.TANH:
            return self.bound * torch.tanh(out / self.bound)
        if self.output_bound is OutputBound.CLAMP:
            return torch.clamp(out, -self.bound, self.bound)
        return out


class TopModel(nn.Module):
    """Activation of the interactive pre-activation ``z``, then an MLP to the outputs.

    ``widths = ()``: no activation and no layer, ``z`` itself is the output (logits).
    """

    def __init__(
        self,
        *,
        in_features: int,
        widths: tuple[int, ...],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.act = activation_layer(activation) if widths else nn.Identity()
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


def binary_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: LossKind = LossKind.BCE,
    focal_gamma: float = 2.0,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """The mean over the batch of ``w_i·(1 − p_t)^γ·bce_i`` (``γ = 0`` for BCE).

    Parameters
    ----------
    logits
        One logit per row, shape ``(B,)``.
    y
        Labels 0/1, shape ``(B,)``.
    loss
        ``bce`` or ``focal`` (``(1 − p_t)^γ`` with ``p_t`` the probability of the true class).
    focal_gamma
        ``γ >= 0`` of the focal loss; ``γ = 0`` is BCE.
    pos_weight
        ``w_i`` of a positive row (> 0); negative rows weigh 1.

    Returns
    -------
    torch.Tensor
        A scalar, mean-reduced over the batch (the interactive layer's bounds assume means).
    """
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_row = bce
    if loss is LossKind.FOCAL and focal_gamma != 0.0:
        p_t = torch.exp(-bce)  # the probability given to the true class
        # clamped away from 0 so that (1 − p_t)^γ keeps a finite gradient for γ < 1
        per_row = per_row * (1.0 - p_t).clamp(min=1e-12) ** focal_gamma
    if pos_weight != 1.0:
        per_row = per_row * torch.where(y > 0.5, pos_weight, 1.0)
    return per_row.mean()
