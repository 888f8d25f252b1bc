"""The "overlap only" reference of the FTL benchmark.

What the two parties would get without federated transfer learning, by handing the labels of
their shared customers to the host: the host trains its own network in plaintext on its
columns of the overlap customers and scores its other customers. The network is the FTL host
network (:func:`vfl.transfer.ftl.representation_net`: an MLP ``in_features -> widths`` with a
tanh output of the representation width ``d = widths[-1]``) followed by a linear head
``d -> 1`` giving a binary logit.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from protocols.errors import ConfigError, DataError
from vfl.transfer.ftl import representation_net


def _features(name: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return array


def _standardise(train: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = np.concatenate([train, score])
    mean = both.mean(axis=0)
    std = both.std(axis=0)
    std[std == 0.0] = 1.0
    return (train - mean) / std, (score - mean) / std


def _scores(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out: np.ndarray = torch.sigmoid(model(x)).squeeze(1).double().numpy()
    return out


def overlap_only_scores(
    *,
    host_features_train: np.ndarray,
    labels_train: np.ndarray,
    host_features_score: np.ndarray,
    widths: tuple[int, ...] = (32, 8),
    max_epochs: int = 20,
    batch: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    validation_fraction: float = 0.2,
    patience: int = 3,
) -> tuple[np.ndarray, dict[str, float | int]]:
    """Train the host network on the overlap customers' labels; score the other host rows.

    Standardisation uses the mean and standard deviation of *all* host rows passed in
    (``host_features_train`` and ``host_features_score`` together): these are the host's own
    features, so no label information enters them. Columns with zero spread are left
    centred only.

    Training: Adam and ``BCEWithLogitsLoss`` on a stratified training part of the overlap rows;
    after every epoch the validation AUC on the remaining ``validation_fraction`` is computed;
    training stops after ``patience`` epochs without improvement or after ``max_epochs``, and the
    parameters of the best epoch are used for scoring.

    Parameters
    ----------
    host_features_train
        Host columns of the overlap customers, shape ``(n, f)``.
    labels_train
        Their labels, 0/1, shape ``(n,)``; both classes must be present.
    host_features_score
        Host columns of the customers to score, shape ``(m, f)``.
    widths
        Widths of the host MLP; the last is the representation width ``d``.
    max_epochs
        Upper bound on the number of epochs.
    batch
        Mini-batch size.
    learning_rate
        Adam step size.
    seed
        Seeds the validation split, the parameter initialisation (``torch.manual_seed`` inside
        ``torch.random.fork_rng``, so the global RNG is left untouched) and the batch order
        (a dedicated ``torch.Generator``). Same seed and inputs give the same scores.
    validation_fraction
        Share of the overlap rows held out, stratified by label, for early stopping.
    patience
        Epochs without a better validation AUC before stopping.

    Returns
    -------
    tuple[numpy.ndarray, dict]
        Probabilities of label 1 for ``host_features_score`` (shape ``(m,)``), and
        ``{"epochs", "best_epoch", "best_val_auc", "train_rows", "validation_rows"}``.

    Raises
    ------
    ConfigError
        If a hyper-parameter is out of range.
    DataError
        If the arrays have wrong shapes, non-finite values, non-binary labels, or too few
        rows of a class for a stratified split.
    """
    if max_epochs < 1 or batch < 1 or patience < 1:
        raise ConfigError(
            f"max_epochs={max_epochs}, batch={batch}, patience={patience} must all be >= 1"
        )
    if not widths or min(widths) < 1:
        raise ConfigError(f"widths={widths} must be a non-empty tuple of positive widths")
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction={validation_fraction} must lie in (0, 1)")
    if not learning_rate > 0.0:
        raise ConfigError(f"learning_rate={learning_rate} must be positive")
    train = _features("host_features_train", host_features_train)
    score = _features("host_features_score", host_features_score)
    if train.shape[1] != score.shape[1]:
        raise DataError(
            f"host_features_train has {train.shape[1]} columns, host_features_score "
            f"{score.shape[1]}"
        )
    labels = np.asarray(labels_train, dtype=np.float64).reshape(-1)
    if labels.shape[0] != train.shape[0]:
        raise DataError(f"{labels.shape[0]} labels for {train.shape[0]} training rows")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataError("labels_train must be 0/1")
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if counts.min() < 2:
        raise DataError(
            f"labels_train has {counts[0]} negatives and {counts[1]} positives: a stratified "
            f"validation split needs at least 2 of each"
        )

    train_x, score_x = _standardise(train, score)
    try:
        fit_x, val_x, fit_y, val_y = train_test_split(
            train_x,
            labels,
            test_size=validation_fraction,
            stratify=labels,
            random_state=seed,
        )
    except ValueError as exc:
        raise DataError(f"cannot split the overlap rows for validation: {exc}") from exc

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            representation_net(train.shape[1], widths[:-1], widths[-1]),
            nn.Linear(widths[-1], 1),
        )
    generator = torch.Generator().manual_seed(seed)
    fit_xt = torch.as_tensor(fit_x, dtype=torch.float32)
    fit_yt = torch.as_tensor(fit_y, dtype=torch.float32).unsqueeze(1)
    val_xt = torch.as_tensor(val_x, dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()

    best_auc = -np.inf
    best_epoch = 0
    best_state = copy.deepcopy(model.state_dict())
    epochs = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = torch.randperm(fit_xt.shape[0], generator=generator)
        for start in range(0, fit_xt.shape[0], batch):
            rows = order[start : start + batch]
            optimiser.zero_grad()
            loss = loss_fn(model(fit_xt[rows]), fit_yt[rows])
            loss.backward()
            optimiser.step()
        epochs = epoch
        auc = float(roc_auc_score(val_y, _scores(model, val_xt)))
        if auc > best_auc:
            best_auc, best_epoch = auc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break

    model.load_state_dict(best_state)
    probabilities = _scores(model, torch.as_tensor(score_x, dtype=torch.float32))
    info: dict[str, float | int] = {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_val_auc": best_auc,
        "train_rows": int(fit_x.shape[0]),
        "validation_rows": int(val_x.shape[0]),
    }
    return probabilities, info
