"""A client's local work in a FedAvg round (F5): plain torch, no channels, no keys."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from vfl.common.metrics import binary_metrics
from vfl.fedavg.protocol import FedJob, Optimizer
from vfl.models.mlp import MLP
from vfl.privacy.dp import dp_epoch


def build_model(job: FedJob, *, in_features: int) -> MLP:
    """The job's model with its initial weights drawn from ``job.init_seed`` by a generator
    of its own (every client builds the same one, whatever else runs in the process); the
    distribution is torch's default for ``nn.Linear``."""
    model = MLP(
        in_features=in_features,
        widths=job.widths,
        activation=job.activation,
        dropout=job.dropout,
    )
    generator = torch.Generator().manual_seed(job.init_seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return model


def client_splits(labels: np.ndarray, *, job: FedJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A client's own train, validation and test rows (stratified, ``job.split_seed``)."""
    rows = np.arange(len(labels))
    stratify = labels if len(np.unique(labels)) == 2 else None
    test = np.array([], dtype=np.int64)
    if job.test_fraction > 0:
        rows, test = train_test_split(
            rows, test_size=job.test_fraction, random_state=job.split_seed, stratify=stratify
        )
    val = np.array([], dtype=np.int64)
    if job.validation_fraction > 0:
        inner = labels[rows] if stratify is not None else None
        rows, val = train_test_split(
            rows,
            test_size=job.validation_fraction / (1 - job.test_fraction),
            random_state=job.split_seed,
            stratify=inner,
        )
    return np.sort(rows), np.sort(val), np.sort(test)


def make_optimizer(job: FedJob, model: nn.Module) -> torch.optim.Optimizer:
    """A fresh local optimizer (every round starts from the new global model)."""
    if job.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(
            model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=job.learning_rate,
        momentum=job.momentum,
        weight_decay=job.weight_decay,
    )


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run torch ops on ``count`` intra-op threads, then restore the setting. Several clients
    or services share a machine's cores; small batches on several threads each would spin
    against each other (measured here: rounds several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_threads(1)  # tabular models gain nothing from intra-op threads (see _threads)
def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    job: FedJob,
    generator: torch.Generator,
) -> int:
    """``job.local_epochs`` epochs of mini-batch training on this client's rows; DP-SGD
    (Poisson batches, per-example clipping, Gaussian noise) when ``job.dp`` is set.
    Returns the optimizer steps taken."""
    optimizer = make_optimizer(job, model)
    model.train()
    steps = 0
    if job.dp is not None:
        per_example = nn.BCEWithLogitsLoss()

        def loss_one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = per_example(out.squeeze(-1), target)
            return result

        for _ in range(job.local_epochs):
            steps += dp_epoch(
                model,
                x,
                y,
                optimizer=optimizer,
                loss_fn=loss_one,
                config=job.dp,
                batch=job.batch,
                generator=generator,
            )
        return steps
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(x)
    for _ in range(job.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, job.batch):
            rows = order[start : start + job.batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[rows]).squeeze(-1), y[rows])
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


@torch.no_grad()
def scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted probabilities of the positive class."""
    model.eval()
    logits = model(torch.from_numpy(np.asarray(x, dtype=np.float32))).squeeze(-1)
    return torch.sigmoid(logits).double().numpy()


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of ``model`` on labelled rows (``rows``: how many, the combination weight)."""
    if len(y) == 0:
        return {"rows": 0.0}
    p = scores(model, x)
    out = {"rows": float(len(y))}
    try:
        out.update(binary_metrics(y, p))
    except ValueError:  # one class only among these rows: AUC undefined
        out["log_loss"] = float(
            -np.mean(y * np.log(np.clip(p, 1e-12, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-12, 1)))
        )
    return out
