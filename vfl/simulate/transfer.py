"""``fit_transfer``: federated transfer learning (FTL), simulated in this process.

The guest holds labelled customers (the source domain), the host other columns of its own
customers (the target domain, no labels); they share only some customers. :func:`fit_transfer`
aligns them by ECDH-PSI, holds out ``test_fraction`` of the common customers (their rows leave
the guest's training data; the host keeps them, unlabelled), and runs the real FTL sessions
with the arbiter over in-memory channels (:func:`vfl.transfer.inprocess.run_in_process`),
always encrypted. The job then scores the host's customers outside the overlap, the test
customers among them, which gives the test metrics.

:meth:`TransferModel.predict` is a simulation shortcut: with both parties in this process it
computes ``Φ·u^B_j`` from the guest's ``Φ`` and the host's network in plaintext, which no
party can do between real silos (there ``Φ`` stays encrypted, docs/protocol.md §6.6).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from protocols.crypto.paillier import check_key_bits
from protocols.errors import ConfigError, DataError
from protocols.executor import Executor
from psi.canon import IdType
from vfl.common import checkpoint
from vfl.common.metrics import binary_metrics
from vfl.data.tables import PartyTable
from vfl.simulate.common import (
    Frame,
    PsiSummary,
    align,
    announcer,
    id_type_of,
    party_table,
    read_frame,
    refuse_worker_import,
    state_folder,
    workers,
)
from vfl.transfer.inprocess import run_in_process
from vfl.transfer.session import FtlJob, column_stats, standardise


@dataclass(frozen=True, eq=False)
class TransferModel:
    """An FTL model fitted by :func:`fit_transfer`: the guest's ``Φ`` and the host's network.

    Attributes
    ----------
    model_id
        The model's id (the training job's id).
    psi
        What the PSI found (the overlap).
    test_rows
        Common customers held out for the test.
    history
        Per epoch: the loss and the validation metrics on held-out overlap pairs.
    best_epoch
        The epoch kept (1-based, best validation AUC).
    test
        Metrics on the held-out customers, from the scores the job computed (encrypted).
    test_scores
        The held-out customers: id, label and the score the job computed.
    seconds
        The job's wall time.
    """

    model_id: str
    psi: PsiSummary
    test_rows: int
    history: tuple[dict[str, float], ...]
    best_epoch: int
    test: dict[str, float]
    test_scores: pd.DataFrame = field(repr=False)
    seconds: float
    id_column: str
    columns: tuple[str, ...]
    job: FtlJob = field(repr=False)
    phi: np.ndarray = field(repr=False)
    network: nn.Module = field(repr=False)
    stats: tuple[np.ndarray, np.ndarray] = field(repr=False)

    def __repr__(self) -> str:
        metrics = ", ".join(
            f"{k} {self.test[k]:.3f}" for k in ("roc_auc", "ks", "accuracy") if k in self.test
        )
        return (
            f"TransferModel({self.model_id!r}, {self.psi.intersection} common ids "
            f"({self.test_rows} held out), epoch {self.best_epoch} of {len(self.history)} kept, "
            f"test {metrics or 'not held out'})"
        )

    def evaluate(
        self, *, host: Frame | None = None, labels: pd.Series | None = None
    ) -> dict[str, float]:
        """Metrics on the held-out customers, or on ``host``'s rows with true ``labels``.

        Parameters
        ----------
        host
            Host rows to score (:meth:`predict`).
        labels
            Their true labels (0/1), indexed by id; every id of ``host`` must have one.

        Examples
        --------
        >>> model.evaluate()["roc_auc"]  # doctest: +SKIP
        0.75
        """
        if host is None and labels is None:
            if not self.test:
                raise ConfigError("no customers were held out (test_fraction = 0)")
            return dict(self.test)
        if host is None or labels is None:
            raise ConfigError("evaluate() takes host= rows and their labels= together")
        scored = self.predict(host=host)
        truth = labels.copy()
        truth.index = truth.index.astype(str)
        missing = ~scored[self.id_column].astype(str).isin(truth.index)
        if missing.any():
            raise DataError(
                f"labels has no entry for id {scored[self.id_column][missing].iloc[0]!r}"
            )
        y = truth.loc[scored[self.id_column].astype(str)].to_numpy(dtype=np.float64)
        return binary_metrics(y, scored["score"].to_numpy())

    def predict(self, *, host: Frame) -> pd.DataFrame:
        """Scores (the probability of label 1) of the host's rows, by id.

        Examples
        --------
        >>> model.predict(host=host.head())  # doctest: +SKIP
                 id     score
        0  ...
        """
        frame = read_frame(host, side="host", id_column=self.id_column)
        table = party_table(
            frame, side="host", id_column=self.id_column, label=None, columns=self.columns
        )
        logits = self._logits(table)
        ids = frame[self.id_column].to_numpy()
        return pd.DataFrame({self.id_column: ids, "score": 1.0 / (1.0 + np.exp(-logits))})

    def _logits(self, table: PartyTable) -> np.ndarray:
        """``φ_j = Φ·u^B_j`` with ``u^B = Net^B`` of the host's standardised rows (§6.6)."""
        self.network.eval()
        with torch.no_grad():
            x = torch.from_numpy(standardise(table.features, stats=self.stats))
            u = self.network(x).double().numpy()
        out: np.ndarray = u @ self.phi
        return out

    def save(self, path: str | Path) -> Path:
        """Write each party's part: ``<path>/guest/ftl-model`` (``Φ``) and
        ``<path>/host/ftl-model`` (the network and its column statistics), each a
        ``tensors.safetensors`` and a ``state.json`` (files 0600, folders 0700)."""
        root = Path(path)
        parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {
            "guest": ({}, {"job": self.job.to_json(), "phi": self.phi.tolist(), "big_ints": {}}),
            "host": (
                dict(self.network.state_dict()),
                {
                    "job": self.job.to_json(),
                    "columns": list(self.columns),
                    "mean": self.stats[0].tolist(),
                    "std": self.stats[1].tolist(),
                    "big_ints": {},
                },
            ),
        }
        for party in parts:
            if (root / party / "ftl-model").exists():
                raise ConfigError(f"{root / party / 'ftl-model'} exists already")
        for party, (tensors, state) in parts.items():
            tmp = checkpoint.write_folder(
                root / party, ".tmp-ftl-model", tensors=tensors, state=state
            )
            checkpoint.replace_folder(tmp, root / party / "ftl-model")
        return root


def fit_transfer(
    *,
    guest: Frame,
    host: Frame,
    label: str,
    id_column: str = "id",
    id_type: IdType | str = IdType.GENERIC,
    epochs: int = 10,
    test_fraction: float = 0.2,
    key_bits: int = 2048,
    allow_test_key: bool = False,
    seed: int = 0,
    model: FtlJob | None = None,
    state_dir: str | Path | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> TransferModel:
    """Train an FTL model between a labelled guest and a host, simulated in this process.

    Parameters
    ----------
    guest
        The guest's rows (DataFrame or CSV path): the id column, the label and its features.
    host
        The host's rows: the id column and its own features (no label).
    label, id_column, id_type
        The guest's label (0/1), the id column of both, and how ids are canonicalised.
    epochs
        Training epochs (early stopping by validation AUC, ``model.patience``).
    test_fraction
        Common customers held out for the test (left out of the guest's training data).
    key_bits, allow_test_key
        The arbiter's key size; below 2048 bits only with ``allow_test_key`` (tests).
    seed
        Seeds the test hold-out and the networks' initial weights and shuffles.
    model
        Networks, batch, learning rates, label protection and validation share
        (:class:`~vfl.transfer.session.FtlJob`; its job id and epochs are replaced).
    state_dir
        Where the parties keep their state (default: a temporary folder, deleted at the end).
    executor
        Workers for the PSI and the Paillier work (default: a local process pool over every
        CPU; a script that uses it must call this under ``if __name__ == "__main__":``).
    progress
        Print the PSI's counts and each epoch's record.

    Returns
    -------
    TransferModel

    Examples
    --------
    >>> import vfl
    >>> guest, host, host_labels = vfl.datasets.credit_transfer()
    >>> model = vfl.fit_transfer(guest=guest, host=host, label="y", epochs=5)  # doctest: +SKIP
    >>> model.predict(host=host).head()  # doctest: +SKIP
    """
    refuse_worker_import("fit_transfer")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test_fraction = {test_fraction}: it must lie in [0, 1)")
    kind = id_type_of(id_type)
    check_key_bits(key_bits, allow_test_key=allow_test_key)
    g_frame = read_frame(guest, side="guest", id_column=id_column)
    h_frame = read_frame(host, side="host", id_column=id_column)
    g_table = party_table(g_frame, side="guest", id_column=id_column, label=label)
    h_table = party_table(h_frame, side="host", id_column=id_column, label=None, not_allowed=label)
    job = dataclasses.replace(
        model or FtlJob(), job_id=f"transfer-{uuid.uuid4().hex[:8]}", epochs=epochs
    )
    say = announcer(progress)
    with workers(executor) as pool:
        g_rows, h_rows, psi = align(
            g_table, h_table, id_type=kind, executor=pool, id_column=id_column
        )
        say(str(psi))
        rng = np.random.default_rng(seed)
        held = rng.permutation(psi.intersection)[: int(round(test_fraction * psi.intersection))]
        test = np.zeros(psi.intersection, dtype=bool)
        test[held] = True
        keep = np.setdiff1d(np.arange(len(g_table)), g_rows[test])  # the guest's training rows
        position = np.full(len(g_table), -1, dtype=np.int64)
        position[keep] = np.arange(len(keep))
        guest_train = g_table.take(keep)
        if guest_train.labels is None:
            raise ConfigError(f"the guest's rows have no label column {label!r}")
        host_overlap = h_rows[~test]
        with state_folder(state_dir, prefix="vfl-transfer-") as folder:
            run = run_in_process(
                job=job,
                guest_features=guest_train.features,
                guest_labels=guest_train.labels,
                guest_overlap=position[g_rows[~test]],
                host_features=h_table.features,
                host_overlap=host_overlap,
                state_dir=folder,
                executor=pool,
                key_bits=key_bits,
                allow_test_key=allow_test_key,
                seed=seed,
                progress=lambda record: say(_record(record)),
            )
    result = run.result
    outside = np.setdiff1d(np.arange(len(h_table)), host_overlap)  # the rows the job scored
    scored = np.asarray(result.scores if result.scores is not None else [], dtype=np.float64)
    logits = scored[np.searchsorted(outside, h_rows[test])] if len(scored) else np.zeros(0)
    y = np.asarray(g_table.labels)[g_rows[test]]
    test_scores = pd.DataFrame(
        {
            id_column: h_frame[id_column].to_numpy()[h_rows[test]],
            label: y,
            "score": 1.0 / (1.0 + np.exp(-logits)),
        }
    )
    metrics = binary_metrics(y, test_scores["score"].to_numpy()) if len(logits) else {}
    out = TransferModel(
        model_id=job.job_id,
        psi=psi,
        test_rows=int(test.sum()),
        history=tuple(result.history),
        best_epoch=result.best_epoch,
        test=metrics,
        test_scores=test_scores,
        seconds=run.seconds,
        id_column=id_column,
        columns=h_table.columns,
        job=job,
        phi=np.asarray(result.phi, dtype=np.float64),
        network=run.host,
        stats=column_stats(h_table.features),
    )
    say(repr(out))
    return out


def _record(record: dict[str, Any]) -> str:
    auc = record.get("val_roc_auc")
    shown = "" if auc is None else f", validation AUC {auc:.4f}"
    return f"epoch {int(record['epoch'])}: loss {record['loss']:.4f}{shown}"
