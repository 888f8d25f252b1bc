"""``fit_horizontal``: FedAvg with secure aggregation between clients, simulated in this process.

Every client holds the same columns of different customers. :func:`fit_horizontal` gives each
client a fresh certificate (it signs its ephemeral keys with it), and the clients and the
aggregator run the real FedAvg sessions over in-memory channels
(:func:`vfl.fedavg.inprocess.run_in_process`): pairwise-masked updates, so the aggregator
only ever sees sums, hidden too by the group mask unless ``group_mask=False``; DP-SGD on
every client with ``dp``. Each client holds out its own validation and test rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from protocols.errors import ConfigError
from protocols.files import private_dir
from protocols.ids import check_identifier
from protocols.roles import Party, Role
from protocols.transport.tls import create_demo_pki, load_demo_identity
from vfl.common.metrics import binary_metrics
from vfl.data.tables import PartyTable
from vfl.fedavg.aggregate import Standardizer
from vfl.fedavg.client import load_fed_model
from vfl.fedavg.inprocess import run_in_process
from vfl.fedavg.protocol import FedJob
from vfl.fedavg.train import scores
from vfl.privacy.dp import DPConfig
from vfl.simulate.common import (
    Frame,
    announcer,
    party_table,
    read_files,
    read_frame,
    refuse_worker_import,
    state_folder,
    write_files,
)


@dataclass(frozen=True, eq=False)
class HorizontalModel:
    """The global model fitted by :func:`fit_horizontal`.

    Attributes
    ----------
    model_id
        The model's id (the training job's id).
    clients
        The clients' names.
    history
        Per round, the aggregator's combination of the clients' validation metrics.
    test
        The clients' held-out test metrics after the last round, combined weighted by
        their row counts (as the aggregator reports them).
    epsilon
        DP-SGD: each client's ε after the last round (None without ``dp``).
    seconds
        The job's wall time.
    """

    model_id: str
    clients: tuple[str, ...]
    history: tuple[dict[str, Any], ...]
    test: dict[str, float]
    epsilon: float | None
    seconds: float
    label: str
    id_column: str
    columns: tuple[str, ...]
    network: torch.nn.Module = field(repr=False)
    standardizer: Standardizer = field(repr=False)
    files: dict[str, bytes] = field(repr=False)

    def __repr__(self) -> str:
        metrics = ", ".join(
            f"{k} {self.test[k]:.3f}" for k in ("roc_auc", "ks", "accuracy") if k in self.test
        )
        dp = "" if self.epsilon is None else f", DP-SGD ε {self.epsilon:.2f}"
        return (
            f"HorizontalModel({self.model_id!r}, clients {', '.join(self.clients)}, "
            f"{len(self.history)} rounds{dp}, test {metrics or 'not held out'})"
        )

    def evaluate(self, frame: Frame | None = None) -> dict[str, float]:
        """Metrics of the global model: the clients' held-out test rows, or ``frame``.

        Parameters
        ----------
        frame
            New labelled rows (the id, label and feature columns); None: the clients'
            combined test metrics (:attr:`test`).

        Examples
        --------
        >>> model.evaluate(test)["roc_auc"]  # doctest: +SKIP
        0.99
        """
        if frame is None:
            if not self.test:
                raise ConfigError("no test rows were held out (test_fraction = 0): pass a frame")
            return dict(self.test)
        rows = read_frame(frame, side="client", id_column=self.id_column)
        table = self._table(rows, label=self.label)
        if table.labels is None:
            raise ConfigError(f"the frame has no label column {self.label!r}")
        return binary_metrics(table.labels, self._scores(table))

    def predict(self, frame: Frame) -> pd.DataFrame:
        """Scores (the probability of label 1) of ``frame``'s rows, by id.

        Examples
        --------
        >>> model.predict(test.head())  # doctest: +SKIP
           id     score
        0  61  0.99...
        """
        rows = read_frame(frame, side="client", id_column=self.id_column)
        table = self._table(rows, label=None)
        return pd.DataFrame(
            {self.id_column: rows[self.id_column].to_numpy(), "score": self._scores(table)}
        )

    def save(self, path: str | Path) -> Path:
        """Write the global model (every client holds the same) to ``path``, as a client's
        ``jobs/<id>/model`` folder (:func:`vfl.fedavg.client.load_fed_model` reads it)."""
        folder = Path(path)
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} is not empty; save to another folder")
        return write_files(self.files, folder)

    def _table(self, rows: pd.DataFrame, *, label: str | None) -> PartyTable:
        return party_table(
            rows, side="client", id_column=self.id_column, label=label, columns=self.columns
        )

    def _scores(self, table: PartyTable) -> np.ndarray:
        return scores(self.network, self.standardizer.transform(table.features))


def fit_horizontal(
    *,
    clients: Mapping[str, Frame],
    label: str,
    id_column: str = "id",
    rounds: int = 10,
    local_epochs: int = 1,
    batch: int = 64,
    learning_rate: float = 0.01,
    widths: tuple[int, ...] = (32, 1),
    group_mask: bool = True,
    dp: DPConfig | None = None,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
) -> HorizontalModel:
    """Train one model by FedAvg with secure aggregation, every party simulated in this process.

    Parameters
    ----------
    clients
        Each client's rows (DataFrame or CSV path) by its name (an identifier; the first
        is the job's coordinator); every client has the same columns.
    label, id_column
        The label (binary: 0 or 1) and id columns.
    rounds, local_epochs, batch, learning_rate
        FedAvg rounds, each client's epochs per round, rows per step, Adam's learning rate.
    widths
        The MLP's layer widths, ending in 1 (one logit).
    group_mask
        Hide the sums from the aggregator too (default); without it the aggregator learns
        the average model of each round.
    dp
        DP-SGD on every client (:class:`~vfl.privacy.dp.DPConfig`), or None.
    test_fraction, validation_fraction
        Each client's own held-out test and validation rows.
    seed
        Seeds the initial model, the row splits and the local batch order.
    state_dir
        Where the parties keep their state (default: a temporary folder, deleted at the end).
    progress
        Print the combined validation metrics of each round.

    Returns
    -------
    HorizontalModel
        The global model, its combined test metrics and the history.

    Examples
    --------
    >>> import vfl
    >>> clients, test = vfl.datasets.breast_horizontal()
    >>> model = vfl.fit_horizontal(clients=clients, label="y", rounds=5)  # doctest: +SKIP
    >>> model.evaluate(test)["roc_auc"] > 0.9  # doctest: +SKIP
    True
    """
    refuse_worker_import("fit_horizontal")
    if len(clients) < 2:
        raise ConfigError(f"FedAvg needs at least two clients, got {len(clients)}")
    tables: dict[str, PartyTable] = {}
    for name, data in clients.items():
        check_identifier(name, what="client name", error=ConfigError)
        frame = read_frame(data, side=name, id_column=id_column)
        tables[name] = party_table(frame, side=name, id_column=id_column, label=label)
    coordinator, *others = tables
    for name in others:
        if tables[name].columns != tables[coordinator].columns:
            raise ConfigError(
                f"client {name}'s feature columns {list(tables[name].columns)} differ from "
                f"{coordinator}'s {list(tables[coordinator].columns)}: every client needs the same"
            )
    job = FedJob(
        job_id=f"horizontal-{uuid.uuid4().hex[:8]}",
        coordinator=coordinator,
        clients=tuple(sorted((name, name) for name in tables)),
        label_column=label,
        id_column=id_column,
        rounds=rounds,
        local_epochs=local_epochs,
        batch=batch,
        learning_rate=learning_rate,
        widths=widths,
        group_mask=group_mask,
        dp=dp,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        split_seed=seed,
        init_seed=seed,
    )
    with state_folder(state_dir, prefix="vfl-horizontal-") as folder:
        parties = [Party(name, Role.GUEST if name == coordinator else Role.HOST) for name in tables]
        pki = private_dir(private_dir(folder) / ".pki")  # owner-only, apart from the clients'
        create_demo_pki(pki, parties)
        identities = {p.party_id: load_demo_identity(pki, p.party_id) for p in parties}
        run = run_in_process(
            job=job,
            tables=tables,
            identities=identities,
            state_dir=folder,
            seed=seed,
        )
        model_dir = Path(run.result.model_dir)
        network, standardizer, _ = load_fed_model(model_dir)
        files = read_files(model_dir)
    history = tuple(run.result.history)
    say = announcer(progress)
    for record in history:
        auc = record.get("validation", {}).get("roc_auc")
        say(
            f"round {record['round']}/{rounds}"
            + ("" if auc is None else f": validation AUC {auc:.4f}")
        )
    out = HorizontalModel(
        model_id=job.job_id,
        clients=tuple(tables),
        history=history,
        test={k: float(v) for k, v in history[-1].get("test", {}).items()} if history else {},
        epsilon=run.result.epsilon,
        seconds=run.seconds,
        label=label,
        id_column=id_column,
        columns=tables[coordinator].columns,
        network=network,
        standardizer=standardizer,
        files=files,
    )
    say(repr(out))
    return out
