"""Flower ClientApp: local training and validation of the repo's MLP on one partition.

The SuperNode's node config gives ``partition-id``; the ClientApp loads
``<work-dir>/client<partition-id>.npz`` (``x_train``, ``y_train``, ``x_val``, ``y_val``).
The model is the engine's own ``vfl.models.mlp.MLP`` (that module imports only torch), found
through the run config's ``repo-root``; hyperparameters come in the server's ConfigRecord.

Training matches the engine's FedAvg client: a fresh ``Adam(lr)`` every round,
``local-epochs`` passes over ``x_train`` in mini-batches of ``batch`` rows drawn by
``torch.randperm`` with a generator seeded by :func:`batch_seed`, mean
``BCEWithLogitsLoss`` on ``model(x).squeeze(-1)``.

Runs only in the Flower venv (``benchmarks/.flower-venv``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

torch.set_num_threads(1)  # 2 cores, 3 clients

Arrays = dict[str, np.ndarray]


def batch_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of the mini-batch order of one client in one round."""
    return seed * 1_000_000 + server_round * 1_000 + partition_id


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) ROC AUC with tied scores given their average rank."""
    positive = np.asarray(y) > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(
        np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True
    )
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    ranks = average_rank[inverse.reshape(-1)]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _int(config: ConfigRecord, key: str) -> int:
    """An integer entry of a ConfigRecord."""
    value = config[key]
    if not isinstance(value, int | float):
        raise TypeError(f"config {key!r} is {value!r}, not a number")
    return int(value)


def _float(config: ConfigRecord, key: str) -> float:
    """A real entry of a ConfigRecord."""
    value = config[key]
    if not isinstance(value, int | float):
        raise TypeError(f"config {key!r} is {value!r}, not a number")
    return float(value)


def load_partition(context: Context) -> Arrays:
    """This node's partition from ``<work-dir>/client<partition-id>.npz``."""
    work = Path(str(context.run_config["work-dir"]))
    partition = int(context.node_config["partition-id"])
    with np.load(work / f"client{partition}.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in ("x_train", "y_train", "x_val", "y_val")}


def make_model(context: Context, config: ConfigRecord, arrays: ArrayRecord) -> torch.nn.Module:
    """The engine's MLP with the global parameters loaded."""
    repo = str(context.run_config["repo-root"])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from vfl.models.mlp import MLP

    widths = config["widths"]
    if not isinstance(widths, list):
        raise TypeError(f"config 'widths' is {widths!r}, not a list")
    model = MLP(
        in_features=_int(config, "in-features"),
        widths=tuple(int(w) for w in widths),
        activation="relu",
    )
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally and send it back."""
    config = msg.content.config_records["config"]
    model = make_model(context, config, msg.content.array_records["arrays"])
    data = load_partition(context)
    x = torch.from_numpy(data["x_train"]).float()
    y = torch.from_numpy(data["y_train"]).float()
    n = x.shape[0]
    batch = _int(config, "batch")
    generator = torch.Generator().manual_seed(
        batch_seed(
            _int(config, "seed"),
            _int(config, "server-round"),
            int(context.node_config["partition-id"]),
        )
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=_float(config, "lr"))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(_int(config, "local-epochs")):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(-1), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.item())
            steps += 1
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": total / max(steps, 1), "num-examples": n}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss (mean BCE) and ROC AUC of the received global model."""
    config = msg.content.config_records["config"]
    model = make_model(context, config, msg.content.array_records["arrays"])
    data = load_partition(context)
    x = torch.from_numpy(data["x_val"]).float()
    y = torch.from_numpy(data["y_val"]).float()
    model.eval()
    with torch.no_grad():
        logits = model(x).squeeze(-1)
        loss = float(torch.nn.BCEWithLogitsLoss()(logits, y).item())
    auc = roc_auc(data["y_val"], logits.numpy())
    metrics = MetricRecord({"loss": loss, "auc": auc, "num-examples": int(x.shape[0])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
