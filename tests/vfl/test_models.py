"""Plain torch parts of the split network."""

from __future__ import annotations

import pytest
import torch

from vfl.models import (
    MLP,
    BottomModel,
    LossKind,
    OutputBound,
    Task,
    TopModel,
    binary_loss,
    loss_for,
)


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


def test_empty_widths_are_identities() -> None:
    x = torch.randn(4, 5)
    assert torch.equal(MLP(in_features=5, widths=())(x), x)
    bottom = BottomModel(in_features=5, widths=(), output_bound=OutputBound.NONE)
    assert bottom.out_features == 5 and not list(bottom.parameters())
    top = TopModel(in_features=1, widths=())
    z = torch.randn(4, 1)
    assert torch.equal(top(z), z)  # not even the activation: z is the output


def test_focal_with_gamma_zero_is_bce() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(64) * 3, (torch.rand(64) < 0.2).float()
    bce = loss_for(Task.BINARY)(logits, y)
    assert torch.allclose(binary_loss(logits, y), bce)
    assert torch.allclose(binary_loss(logits, y, loss=LossKind.FOCAL, focal_gamma=0.0), bce)
    focal = binary_loss(logits, y, loss=LossKind.FOCAL, focal_gamma=2.0)
    assert 0 < focal.item() < bce.item()  # easy rows weigh less


def test_weighted_bce_is_the_mean_of_weighted_rows() -> None:
    logits, y = torch.tensor([0.3, -1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    weights = torch.tensor([5.0, 1.0, 1.0, 5.0])
    expected = (weights * per_row).mean()  # still mean-reduced over the batch
    assert torch.allclose(binary_loss(logits, y, pos_weight=5.0), expected)
    p_t = torch.exp(-per_row)
    focal = (weights * (1 - p_t) ** 1.5 * per_row).mean()
    got = binary_loss(logits, y, loss=LossKind.FOCAL, focal_gamma=1.5, pos_weight=5.0)
    assert torch.allclose(got, focal)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_loss_gradients_are_finite(gamma: float) -> None:
    """Even for saturated logits, where p_t rounds to 1 and (1 − p_t)^γ has no slope at 0."""
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0], requires_grad=True)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    loss = binary_loss(logits, y, loss=LossKind.FOCAL, focal_gamma=gamma, pos_weight=10.0)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.isfinite(loss)
