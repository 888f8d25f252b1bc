"""The guest-only baseline: the guest's own bottom, ``W_g, b`` and top model on its features.

What the bank would get without the retailer: the same guest architecture and optimizer as
the split model (``TrainConfig``), trained in plaintext at the guest alone on the same
training rows and batch order, the epoch with the best validation metric kept, and the
held-out test rows scored once. Nothing leaves the guest.
"""

from __future__ import annotations

import numpy as np
import torch

from protocols.errors import ConfigError
from vfl.common.metrics import selection_metric, task_metrics
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import BatchOrder, PartyTable, Splits
from vfl.splitnn.training import (
    TrainConfig,
    guest_models,
    make_optimizer,
    resolve_pos_weight,
    task_loss,
    task_scores,
)


def guest_only_scores(
    table: PartyTable,
    splits: Splits,
    config: TrainConfig,
    *,
    batch: int,
    epochs: int,
    patience: int,
    order_seed: bytes = bytes(32),
) -> np.ndarray:
    """Test-row scores of the guest-only model (early stopping on validation).

    Parameters
    ----------
    table
        The guest's aligned rows with labels.
    splits
        The job's training, validation and test rows.
    config
        The split model's configuration (guest widths, optimizer, task, loss; a balanced class
        weight from the training rows' labels).
    batch, epochs, patience
        As in the split job.
    order_seed
        Seeds the batch order.
    """
    if table.labels is None:
        raise ConfigError(f"{table.source}: the guest-only baseline needs labels")
    torch.manual_seed(config.seed)
    x = torch.tensor(
        Preprocessor.fit(table, splits.train).transform(table),
        dtype=torch.float32,
    )
    y = torch.tensor(table.labels, dtype=torch.float32)
    models = guest_models(x.shape[1], config)
    optimizer = make_optimizer(list(models.parameters()), config)
    order = BatchOrder(order_seed, batch_size=batch)
    pos_weight = resolve_pos_weight(config, table.labels[splits.train])

    @torch.no_grad()
    def scores(rows: np.ndarray) -> np.ndarray:
        models.eval()
        return task_scores(config.task, models.top(models.own_z(x[rows])))

    name, higher = selection_metric(config.task)
    sign = 1.0 if higher else -1.0
    best, best_state, waited = -np.inf, models.state_dict(), 0
    for epoch in range(epochs):
        models.train()
        for rows in order.epoch(splits.train, epoch):
            optimizer.zero_grad()
            out = models.top(models.own_z(x[rows]))
            loss = task_loss(
                config.task,
                out,
                y[rows],
                loss=config.loss,
                focal_gamma=config.focal_gamma,
                pos_weight=pos_weight,
            )
            torch.autograd.backward(loss)
            optimizer.step()
        if not len(splits.validation):
            best_state = {k: v.clone() for k, v in models.state_dict().items()}
            continue
        metrics = task_metrics(
            config.task, table.labels[splits.validation], scores(splits.validation)
        )
        metric = sign * metrics[name]
        if metric > best:
            best, waited = metric, 0
            best_state = {k: v.clone() for k, v in models.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    models.load_state_dict(best_state)
    return scores(splits.test)
