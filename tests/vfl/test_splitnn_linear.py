"""Linear parts of the split network (empty widths), the loss options for rare positives, and
their path through the job file, the host's view and the saved model's manifest."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import ConfigError, DataError
from tests.vfl.session_setup import run_job, synthetic_tables, trio
from vfl.models.split import ClassWeight, LossKind, Task
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.job import SplitJob
from vfl.splitnn.jobfile import parse_job
from vfl.splitnn.saved import config_from_json, config_to_json, load_model
from vfl.splitnn.training import (
    GuestModels,
    TrainConfig,
    guest_backward,
    guest_scores,
    host_bottom,
    resolve_pos_weight,
)

PROTECT_OFF = ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)
LINEAR = TrainConfig(
    d=2,
    k=1,
    guest_widths=(),
    host_widths=(),
    top_widths=(),
    learning_rate=0.05,
    protect=PROTECT_OFF,
)


def test_linear_parts_have_the_shapes_of_a_logistic_regression() -> None:
    """guest: x_g·W_g + b; host: one bounded linear layer to d; no top model."""
    guest = GuestModels(3, LINEAR)
    assert sorted(guest.state_dict()) == ["w_g.bias", "w_g.weight"]
    assert guest.w_g.weight.shape == (1, 3)
    x = torch.randn(5, 3)
    z = guest.own_z(x)
    assert torch.allclose(z, x @ guest.w_g.weight.T + guest.w_g.bias)
    assert torch.equal(guest.top(z), z)  # no activation, no layer: z is the logit
    host = host_bottom(4, LINEAR)
    assert sorted(host.state_dict()) == ["mlp.net.0.bias", "mlp.net.0.weight"]
    assert host(torch.randn(7, 4) * 1e4).abs().max() <= LINEAR.a_max


def test_non_empty_models_keep_their_state_dict_keys() -> None:
    """Saved models and checkpoints of the MLP case still load: the key names are unchanged."""
    keys = sorted(GuestModels(3, TrainConfig()).state_dict())
    assert keys == [
        "bottom.mlp.net.0.bias",
        "bottom.mlp.net.0.weight",
        "bottom.mlp.net.2.bias",
        "bottom.mlp.net.2.weight",
        "top.mlp.net.0.bias",
        "top.mlp.net.0.weight",
        "w_g.bias",
        "w_g.weight",
    ]
    assert sorted(host_bottom(4, TrainConfig()).state_dict()) == [
        "mlp.net.0.bias",
        "mlp.net.0.weight",
        "mlp.net.2.bias",
        "mlp.net.2.weight",
    ]


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"top_widths": (), "k": 2}, "needs k = 1"),
        ({"top_widths": (), "k": 2, "task": Task.MULTICLASS}, "number of classes"),
        ({"top_widths": (), "k": 1, "task": Task.REGRESSION, "loss": LossKind.FOCAL}, "binary"),
        ({"top_widths": (0,)}, "widths must be >= 1"),
        ({"loss": "hinge"}, "loss = 'hinge': use one of bce, focal"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"pos_weight": 0.0}, "pos_weight"),
        ({"class_weight": ClassWeight.BALANCED, "pos_weight": 3.0}, "balanced"),
        ({"task": Task.REGRESSION, "pos_weight": 2.0}, "binary tasks"),
    ],
)
def test_bad_model_settings_say_why(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**changes)


def test_multiclass_without_top_model_uses_k_classes() -> None:
    config = TrainConfig(k=4, top_widths=(), task=Task.MULTICLASS)
    assert config.outputs == 4 and config.protect.num_classes == 4


def test_balanced_pos_weight_is_negatives_over_positives() -> None:
    labels = np.array([0, 0, 0, 1, 0, 0, 1, 0, 0, 0], dtype=np.float64)
    balanced = TrainConfig(class_weight=ClassWeight.BALANCED)
    assert resolve_pos_weight(balanced, labels) == 4.0
    assert resolve_pos_weight(TrainConfig(pos_weight=2.5), labels) == 2.5
    with pytest.raises(DataError, match="both classes"):
        resolve_pos_weight(balanced, np.zeros(8))


def test_guest_backward_uses_the_weighted_loss() -> None:
    """The returned δ is ∂L/∂z of the weighted mean: a positive row's δ scales by pos_weight."""
    guest = GuestModels(3, LINEAR)
    x, y = torch.randn(4, 3), torch.tensor([1.0, 0.0, 1.0, 0.0])
    z_h = torch.zeros(4, 1)
    _, plain = guest_backward(Task.BINARY, guest, z_h, guest.own_z(x), y)
    _, weighted = guest_backward(Task.BINARY, guest, z_h, guest.own_z(x), y, pos_weight=3.0)
    expected = plain * torch.tensor([[3.0], [1.0], [3.0], [1.0]])
    assert torch.allclose(weighted, expected, atol=1e-7)
    _, focal = guest_backward(
        Task.BINARY, guest, z_h, guest.own_z(x), y, loss=LossKind.FOCAL, focal_gamma=2.0
    )
    assert torch.isfinite(focal).all() and focal.abs().sum() < plain.abs().sum()


def test_loss_settings_stay_at_the_guest_and_round_trip() -> None:
    """host_part carries none of them; the job file's JSON and the manifest round-trip, and a
    manifest written before they existed still loads with the defaults."""
    train = dataclasses.replace(
        LINEAR, loss=LossKind.FOCAL, focal_gamma=1.5, class_weight=ClassWeight.BALANCED
    )
    host_view = SplitJob(job_id="lin", train=train).host_part()["train"]
    assert not {"loss", "focal_gamma", "class_weight", "pos_weight"} & set(host_view)
    assert SplitJob.from_host_part(SplitJob(job_id="lin", train=train).host_part()).train.k == 1
    raw = {
        "job": {"guest_data": "g", "host_data": "h"},
        "model": {
            "k": 1,
            "guest_widths": [],
            "host_widths": [],
            "top_widths": [],
            "loss": "focal",
            "focal_gamma": 1,
            "pos_weight": 4,
        },
    }
    parsed = parse_job(raw, source="job.toml")
    model = parsed.to_json()["model"]
    assert model["loss"] == "focal" and type(model["loss"]) is str
    assert model["class_weight"] == "none" and model["focal_gamma"] == 1.0
    assert model["top_widths"] == []
    assert parse_job(parsed.to_json(), source="again") == parsed
    saved = config_to_json(train)
    assert saved["loss"] == "focal" and saved["class_weight"] == "balanced"
    assert config_from_json(saved) == train
    old = {k: v for k, v in config_to_json(TrainConfig()).items()}
    for key in ("loss", "focal_gamma", "class_weight", "pos_weight"):
        del old[key]
    assert config_from_json(old) == TrainConfig()


def test_linear_split_model_learns_end_to_end(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    """guest_widths = host_widths = top_widths = () and k = 1: a vertical logistic regression
    trained through the whole encrypted protocol, saved, reloaded and scored."""
    started = time.monotonic()
    guest_table, host_table, splits = synthetic_tables(rows=160, seed=1)
    job = SplitJob(job_id="linear", train=LINEAR, batch=16, batch_eval=32, epochs=2, patience=2)
    out = run_job(trio(tmp_path, pk, sk), job, guest_table, host_table, splits)
    assert not out.errors, out.errors
    assert out.result is not None
    assert out.result.test["roc_auc"] > 0.8  # a linearly separable task: far above chance
    assert {"pr_auc", "recall_at_fpr_5pct", "brier"} <= set(out.result.test)
    gm = load_model(tmp_path / "bank", "linear")
    hm = load_model(tmp_path / "retailer", "linear")
    assert gm.config == LINEAR and not gm.config.top_widths
    module = gm.guest_module()
    assert sorted(module.state_dict()) == ["w_g.bias", "w_g.weight"]
    scores = guest_scores(
        module, Task.BINARY, np.zeros((3, 1)), np.zeros((3, len(gm.manifest["columns"])))
    )
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    assert len(hm.host_module().state_dict()) == 2
    assert time.monotonic() - started < 15.0
