"""A configurable multi-layer perceptron, the building block of bottom and top models."""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def activation_layer(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``tanh``, ``gelu``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r}: use one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """``in_features -> widths[0] -> ... -> widths[-1]`` with an activation between layers.

    Empty ``widths`` give the identity (no layer, no parameter): a linear model is then the
    identity followed by the caller's own linear layer.

    Parameters
    ----------
    in_features
        Input width.
    widths
        Output width of each linear layer; the last layer has no activation. ``()``: the
        identity.
    activation
        ``"relu"``, ``"tanh"`` or ``"gelu"``.
    dropout
        Dropout probability after each hidden activation.
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
        if in_features < 1 or (widths and min(widths) < 1):
            raise ValueError(f"MLP needs positive widths, got in={in_features} widths={widths}")
        activation_layer(activation)  # fails early on an unknown name
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must lie in [0, 1)")
        layers: list[nn.Module] = []
        width = in_features
        for i, out in enumerate(widths):
            layers.append(nn.Linear(width, out))
            if i < len(widths) - 1:
                layers.append(activation_layer(activation))
                if dropout:
                    layers.append(nn.Dropout(dropout))
            width = out
        self.net = nn.Sequential(*layers)  # empty: the identity
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers."""
        out: torch.Tensor = self.net(x)
        return out
