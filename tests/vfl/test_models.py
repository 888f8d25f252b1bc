"""Plain torch parts of the split network."""

from __future__ import annotations

import pytest
import torch

from vfl.models import MLP, BottomModel, OutputBound, Task, TopModel, loss_for


@pytest.mark.parametrize("bound_kind", [OutputBound.TANH, OutputBound.CLAMP])
def test_host_bottom_output_is_bounded(bound_kind: OutputBound) -> None:
    torch.manual_seed(0)
    model = BottomModel(in_features=10, widths=(16, 8), output_bound=bound_kind, bound=8.0)
    out = model(torch.randn(64, 10) * 1000)
    assert out.shape == (64, 8) and model.out_features == 8
    assert out.abs().max().item() <= 8.0
    out.sum().backward()  # differentiable for the host's backward pass


def test_unbounded_guest_bottom_and_top() -> None:
    bottom = BottomModel(in_features=13, widths=(8,), output_bound=OutputBound.NONE)
    top = TopModel(in_features=8, widths=(4, 1), activation="tanh", dropout=0.1)
    logits = top(bottom(torch.randn(5, 13)))
    loss = loss_for(Task.BINARY)(logits.squeeze(1), torch.tensor([0.0, 1, 0, 1, 1]))
    loss.backward()
    assert logits.shape == (5, 1) and loss.item() > 0


def test_losses_and_bad_arguments() -> None:
    assert isinstance(loss_for(Task.MULTICLASS), torch.nn.CrossEntropyLoss)
    assert isinstance(loss_for(Task.REGRESSION), torch.nn.MSELoss)
    with pytest.raises(ValueError, match="activation"):
        MLP(in_features=3, widths=(2,), activation="swish")
    with pytest.raises(ValueError, match="bound"):
        BottomModel(in_features=3, widths=(2,), bound=0)
