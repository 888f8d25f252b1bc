"""``fit_vertical``: a split NN between a guest and a host, simulated in this process.

The guest holds the labels and some columns of its customers, the host other columns of
(partly) the same customers. :func:`fit_vertical` runs what two silos would run, with every
party in this process: the ECDH-PSI aligns the two frames by id (:mod:`psi.inprocess`), the
guest splits the common rows into training, validation and held-out test rows, and the
guest, the host and the arbiter train the split NN with the real sessions over in-memory
channels (:func:`vfl.splitnn.inprocess.run_in_process`): encrypted under a fresh 2048-bit
Paillier key unless ``plaintext=True``.

Each party's columns are features as its :class:`~vfl.data.features.FeatureSpec` says
(``guest_features``, ``host_features``: which columns, which hold categories or dates, how
missing values are filled), preprocessed on the training rows only
(:mod:`vfl.data.preprocess`). After training the guest fits a
:class:`~vfl.common.decision.Decision` (calibration and threshold) on the kept model's
validation scores, so the test rows and new rows get a calibrated ``probability`` and a
``decision`` besides the raw ``score``.

The returned :class:`VerticalModel` holds both parties' saved parts
(:mod:`vfl.splitnn.saved`). Its :meth:`~VerticalModel.predict` is a simulation shortcut:
with both parts in one process it adds the two shares of the host's interactive weights,
which no party can do between real silos (they score with :mod:`vfl.scoring`); the scores
equal the protocol's, as the test rows' scores show (fixed point, within 1e-6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from protocols.crypto.fixedpoint import decode, encode, ring
from protocols.crypto.paillier import PublicKey, check_key_bits
from protocols.errors import ConfigError
from protocols.executor import Executor
from protocols.ids import state_path
from psi.canon import IdType
from vfl.common.decision import Decision, DecisionConfig
from vfl.common.metrics import binary_metrics
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, split_rows
from vfl.models.split import Task
from vfl.privacy.label_protection import ProtectConfig
from vfl.simulate.common import (
    Frame,
    PsiSummary,
    align,
    announcer,
    class_names,
    feature_spec,
    id_type_of,
    party_table,
    read_files,
    read_frame,
    refuse_worker_import,
    state_folder,
    workers,
    write_files,
)
from vfl.splitnn.guest import BEST_VALIDATION
from vfl.splitnn.inprocess import run_in_process
from vfl.splitnn.job import Progress, SplitJob
from vfl.splitnn.saved import SavedModel, load_model
from vfl.splitnn.training import TrainConfig, guest_scores

logger = logging.getLogger(__name__)

MAX_EVAL_BATCH = 1024


@dataclass(frozen=True)
class Rows:
    """How many aligned rows went to training, validation and the held-out test."""

    train: int
    validation: int
    test: int


@dataclass(frozen=True, eq=False)
class VerticalModel:
    """A split NN fitted by :func:`fit_vertical`: both parties' saved parts, in memory.

    Attributes
    ----------
    model_id
        The model's id (the training job's id).
    encrypted
        Whether training was encrypted (False only with ``plaintext=True``).
    psi
        What the PSI found.
    rows
        Aligned rows used for training, validation and the held-out test.
    history
        Per epoch: the training loss and the validation metrics.
    best_epoch
        The epoch kept (best validation AUC).
    test
        Metrics on the held-out test rows, computed by the guest through the protocol.
    test_scores
        The held-out test rows: id, label (the class index with ``classes``) and the score
        the protocol computed; with a :attr:`decision`, also the calibrated ``probability``
        and the ``decision`` (bool: flagged at the threshold).
    seconds
        The training job's wall time.
    label, id_column, id_type
        The guest's label column, both parties' id column and how ids are canonicalised.
    guest, host, public_key, files
        Each party's saved part, the arbiter's public key and the saved files.
    classes
        The label values in class order (``classes[1]`` is label 1), or None (labels 0/1).
    decision
        The calibration and threshold the guest fitted on the kept model's validation
        scores (:class:`~vfl.common.decision.Decision`), or None (no validation rows, or
        one class among them).
    test_calibrated
        Metrics of the calibrated test scores (:func:`vfl.common.metrics.binary_metrics`;
        its Brier score is the calibration's); empty without a :attr:`decision`.
    validation_scores
        The validation rows as :attr:`test_scores` has the test rows, with the kept
        model's scores: what the guest fitted the :attr:`decision` on (e.g. to compare
        calibrations on validation rows only); empty without validation rows.
    """

    model_id: str
    encrypted: bool
    psi: PsiSummary
    rows: Rows
    history: tuple[dict[str, float], ...]
    best_epoch: int
    test: dict[str, float]
    test_scores: pd.DataFrame = field(repr=False)
    seconds: float
    label: str
    id_column: str
    id_type: IdType
    guest: SavedModel = field(repr=False)
    host: SavedModel = field(repr=False)
    public_key: PublicKey = field(repr=False)
    files: dict[str, dict[str, bytes]] = field(repr=False)
    classes: tuple[str, ...] | None = None
    decision: Decision | None = field(default=None, repr=False)
    test_calibrated: dict[str, float] = field(default_factory=dict)
    validation_scores: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def __repr__(self) -> str:
        metrics = ", ".join(
            f"{k} {self.test[k]:.3f}" for k in ("roc_auc", "ks", "accuracy") if k in self.test
        )
        return (
            f"VerticalModel({self.model_id!r}, {'encrypted' if self.encrypted else 'PLAINTEXT'}, "
            f"{self.psi.intersection} aligned ids (train {self.rows.train}, validation "
            f"{self.rows.validation}, test {self.rows.test}), epoch {self.best_epoch + 1} of "
            f"{len(self.history)} kept, test {metrics})"
        )

    def evaluate(
        self,
        *,
        guest: Frame | None = None,
        host: Frame | None = None,
        executor: Executor | None = None,
    ) -> dict[str, float]:
        """Metrics of the model: on the held-out test rows, or on new labelled rows.

        Parameters
        ----------
        guest, host
            New rows of each party (the guest's with the label column), aligned by PSI as in
            :meth:`predict`; both or neither. Neither: the held-out test rows' metrics.
        executor
            Workers for the PSI of new rows (default: a local process pool over every CPU).

        Returns
        -------
        dict
            The metrics of the raw scores (:func:`vfl.common.metrics.binary_metrics`: ROC
            AUC, PR AUC, recall at 1 % and 5 % FPR, Brier score, KS, log loss, ...); the
            calibrated test scores' are :attr:`test_calibrated`.

        Examples
        --------
        >>> model.evaluate()["roc_auc"]  # doctest: +SKIP
        0.99
        """
        if guest is None and host is None:
            return dict(self.test)
        if guest is None or host is None:
            raise ConfigError("evaluate() takes new rows of both parties (guest= and host=)")
        spec = self.guest.preprocessor.spec
        frame = read_frame(
            guest, side="guest", id_column=self.id_column, text_columns=_text_columns(spec)
        )
        labelled = party_table(
            frame,
            side="guest",
            id_column=self.id_column,
            label=self.label,
            features=spec,
            classes=self.classes,
        )
        if labelled.labels is None:
            raise ConfigError(f"the guest's rows have no label column {self.label!r}")
        by_id = pd.Series(labelled.labels, index=labelled.ids)
        scored = self.predict(guest=frame, host=host, executor=executor)
        y = by_id.loc[scored[self.id_column].astype(str)].to_numpy(dtype=np.float64)
        return binary_metrics(y, scored["score"].to_numpy())

    def predict(
        self, *, guest: Frame, host: Frame, executor: Executor | None = None
    ) -> pd.DataFrame:
        """Scores of the customers both parties hold, aligned by PSI as in training.

        Only ids present at both parties get a score (the model needs both parties'
        features); the others are left out, and a warning says how many. Between real
        silos only the guest would learn the scores (docs/protocol.md §5).

        Parameters
        ----------
        guest, host
            Each party's rows with the model's columns (a label column is ignored).
        executor
            Workers for the PSI (default: a local process pool over every CPU).

        Returns
        -------
        pandas.DataFrame
            Columns ``<id column>`` and ``score`` (the model's raw probability of label 1),
            in the order of the guest's rows; with a :attr:`decision`, also ``probability``
            (the calibrated score) and ``decision`` (bool: calibrated score at or above the
            threshold).

        Examples
        --------
        >>> model.predict(guest=guest.head(), host=host.head())  # doctest: +SKIP
            id     score
        0  133  0.98...
        """
        refuse_worker_import("predict")
        g_spec, h_spec = self.guest.preprocessor.spec, self.host.preprocessor.spec
        g_frame = read_frame(
            guest, side="guest", id_column=self.id_column, text_columns=_text_columns(g_spec)
        )
        h_frame = read_frame(
            host, side="host", id_column=self.id_column, text_columns=_text_columns(h_spec)
        )
        g_table = party_table(
            g_frame, side="guest", id_column=self.id_column, label=None, features=g_spec
        )
        h_table = party_table(
            h_frame,
            side="host",
            id_column=self.id_column,
            label=None,
            features=h_spec,
            # a host column named like the label is refused unless the model uses it
            not_allowed=None if self.label in (h_spec.feature_columns or ()) else self.label,
        )
        with workers(executor) as pool:
            g_rows, h_rows, psi = align(
                g_table, h_table, id_type=self.id_type, executor=pool, id_column=self.id_column
            )
        order = np.argsort(g_rows, kind="stable")
        g_rows, h_rows = g_rows[order], h_rows[order]
        if psi.intersection < len(g_table):
            logger.warning(
                "%d of the guest's %d rows have no match at the host: no score for them",
                len(g_table) - psi.intersection,
                len(g_table),
            )
        scores = self._scores(g_table.take(g_rows), h_table.take(h_rows))
        ids = g_frame[self.id_column].iloc[g_rows].to_numpy()
        return _decided(pd.DataFrame({self.id_column: ids, "score": scores}), self.decision)

    def _scores(self, guest: PartyTable, host: PartyTable) -> np.ndarray:
        """The protocol's forward pass with both saved parts: ``z_h = â·(W^G + E)`` in fixed
        point (the host's F1 without encryption), then the guest's bottom and top model."""
        gm, hm = self.guest, self.host
        fp = hm.fixed_point
        n = self.public_key.n
        x_h = hm.preprocessor.transform(host)
        with torch.no_grad():
            alpha = hm.host_module()(torch.tensor(x_h, dtype=torch.float32)).double().numpy()
        w_h = gm.big_ints["wg"] + hm.big_ints["e"]  # the two shares of W_h
        a_hat = encode(alpha, scale=fp.f_a, bound=fp.a_max)
        z_h = decode(ring(a_hat.dot(w_h), n), n, scale=fp.f_z, bound=fp.z_bound(hm.config.d))
        scores = guest_scores(
            gm.guest_module(), gm.config.task, z_h, gm.preprocessor.transform(guest)
        )
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    def save(self, path: str | Path) -> Path:
        """Write each party's saved part: ``<path>/guest/models/<model id>/`` and
        ``<path>/host/models/<model id>/`` (files 0600, folders 0700).

        Each of the two folders is what that party's own state folder would hold after
        the job (:func:`vfl.splitnn.saved.load_model` reads it).

        Examples
        --------
        >>> model.save("my-model")  # doctest: +SKIP
        PosixPath('my-model')
        """
        root = Path(path)
        for party in ("guest", "host"):
            folder = root / party / "models" / self.model_id
            if folder.exists():
                raise ConfigError(f"{folder} exists already; save to another folder")
        for party, files in self.files.items():
            write_files(files, root / party / "models" / self.model_id)
        return root


def fit_vertical(
    *,
    guest: Frame,
    host: Frame,
    label: str,
    id_column: str = "id",
    id_type: IdType | str = IdType.GENERIC,
    epochs: int = 10,
    batch: int | None = None,
    plaintext: bool = False,
    key_bits: int = 2048,
    allow_test_key: bool = False,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    seed: int = 0,
    protect: ProtectConfig | None = None,
    model: TrainConfig | None = None,
    guest_features: FeatureSpec | Mapping[str, Any] | None = None,
    host_features: FeatureSpec | Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    decision: DecisionConfig | None = None,
    state_dir: str | Path | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> VerticalModel:
    """Train a split NN between a guest and a host, every party simulated in this process.

    Parameters
    ----------
    guest
        The guest's rows (DataFrame or CSV path): the id column, the label and its features.
    host
        The host's rows: the id column and its features (no label).
    label
        The guest's label column (binary: 0 or 1, or the two values of ``classes``).
    id_column
        The id column of both parties.
    id_type
        How ids are canonicalised for the PSI: ``generic``, ``email``, ``phone`` or
        ``national_id``.
    epochs, batch
        Training epochs (early stopping after 3 without a better validation AUC) and rows
        per step (default: :func:`default_batch` of the training rows).
    plaintext
        Train without encryption (experiments only; logged as a warning). The default
        encrypts under the arbiter's fresh Paillier key.
    key_bits, allow_test_key
        The arbiter's key size; below 2048 bits only with ``allow_test_key`` (tests: such a
        key is insecure).
    test_fraction, validation_fraction
        Aligned rows held out for the test (never seen in training) and, of the rest, for
        validation (early stopping).
    seed
        Seeds the whole run (``model.seed`` is replaced): the row split, both parties'
        initial weights, the batch order and the label protection's noise, so the same call
        gives the same model bit for bit (docs/protocol.md §4.4.2); the protocol's masks and
        shares always come from the OS (they cancel exactly).
    protect
        Label protection (default :class:`~vfl.privacy.label_protection.ProtectConfig`:
        Marvell with persistent noise); give it here, not in ``model``.
    model
        The network, loss and optimiser (:class:`~vfl.splitnn.training.TrainConfig`, binary
        task; e.g. ``class_weight="balanced"`` or ``loss="focal"`` for rare positives, all
        widths ``()`` with ``k=1`` for a vertical logistic regression).
    guest_features, host_features
        Each party's feature columns and their encodings: a
        :class:`~vfl.data.features.FeatureSpec`, or a mapping of its keys as a job file's
        ``[features]`` table has them (``feature_columns``, ``exclude_columns``,
        ``categorical``, ``date_columns``, ``max_categories``, ``impute``; parsed with
        :meth:`~vfl.data.features.FeatureSpec.parse`). Default: every column but the id
        (and the label) is a numeric feature. At the host a column named like ``label`` is
        refused unless ``host_features`` lists it in ``feature_columns``.
    classes
        The label's two values in class order, as a job file's ``[job] classes``: the
        first is label 0, the second label 1 (the positive class). Default: labels are 0/1.
    decision
        How the guest turns scores into probabilities and decisions: calibration
        (``platt``, ``isotonic`` or ``none``) and threshold rule, fitted on the kept model's
        validation rows (:class:`~vfl.common.decision.DecisionConfig`; default: Platt
        scaling, the threshold at 5 % validation false-positive rate).
    state_dir
        Where the parties keep their state (default: a temporary folder, deleted at the end).
    executor
        Workers for the PSI and the Paillier work (default: a local process pool over every
        CPU; a script that uses it must call this under ``if __name__ == "__main__":``).
    progress
        Print the PSI's counts and each epoch's validation metrics.

    Returns
    -------
    VerticalModel
        Both parties' trained parts, the test metrics (raw and calibrated), the fitted
        decision and the training history.

    Raises
    ------
    DataError
        A missing id or label column, a label at the host, text in a column not declared
        categorical or a date, a duplicate id, labels other than 0/1 (or ``classes``), or no
        id in common.
    ConfigError
        Inconsistent settings (e.g. a small key without ``allow_test_key``, a malformed
        feature spec, ``classes`` not two values).

    Examples
    --------
    >>> import vfl
    >>> guest, host = vfl.datasets.breast()
    >>> model = vfl.fit_vertical(guest=guest, host=host, label="y", epochs=3)  # doctest: +SKIP
    >>> model.evaluate()["roc_auc"] > 0.9  # doctest: +SKIP
    True

    Text and date columns, rare positives, isotonic calibration:

    >>> guest, host = vfl.datasets.fraud()
    >>> model = vfl.fit_vertical(
    ...     guest=guest,
    ...     host=host,
    ...     label="y",
    ...     guest_features={"categorical": ["bill_band"], "date_columns": ["opened"]},
    ...     host_features={"categorical": ["age_band"]},
    ...     model=vfl.TrainConfig(class_weight="balanced"),
    ...     decision=vfl.DecisionConfig(calibration="isotonic"),
    ... )  # doctest: +SKIP
    >>> model.test_scores.columns.tolist()  # doctest: +SKIP
    ['id', 'y', 'score', 'probability', 'decision']
    """
    refuse_worker_import("fit_vertical")
    kind = id_type_of(id_type)
    check_key_bits(key_bits, allow_test_key=allow_test_key)
    config = _config(model, protect, seed)
    g_spec = feature_spec(guest_features, where="guest_features")
    h_spec = feature_spec(host_features, where="host_features")
    names = class_names(classes)
    g_frame = read_frame(
        guest, side="guest", id_column=id_column, text_columns=_text_columns(g_spec)
    )
    h_frame = read_frame(host, side="host", id_column=id_column, text_columns=_text_columns(h_spec))
    g_table = party_table(
        g_frame, side="guest", id_column=id_column, label=label, features=g_spec, classes=names
    )
    h_table = party_table(
        h_frame, side="host", id_column=id_column, label=None, features=h_spec, label_like=label
    )
    say = announcer(progress)
    with workers(executor) as pool:
        g_rows, h_rows, psi = align(
            g_table, h_table, id_type=kind, executor=pool, id_column=id_column
        )
        say(str(psi))
        g_aligned, h_aligned = g_table.take(g_rows), h_table.take(h_rows)
        labels = g_aligned.labels
        if labels is None:
            raise ConfigError(f"the guest's rows have no label column {label!r}")
        splits = split_rows(
            labels,
            test_fraction=test_fraction,
            validation_fraction=validation_fraction,
            seed=seed,
            # the split follows the customers, not this PSI's order (docs/protocol.md §4.4.2)
            file_rows=g_aligned.file_rows,
            shuffle=hashlib.sha256(f"vfl-simulation-split|{seed}".encode()).digest(),
        )
        held_out = max(len(splits.validation), len(splits.test), 1)
        job = SplitJob(
            job_id=f"vertical-{uuid.uuid4().hex[:8]}",
            train=config,
            batch=batch or default_batch(len(splits.train)),
            batch_eval=min(held_out, MAX_EVAL_BATCH),
            epochs=epochs,
            encrypted=not plaintext,
        )
        with state_folder(state_dir, prefix="vfl-vertical-") as folder:
            run = run_in_process(
                job=job,
                guest_table=g_aligned,
                host_table=h_aligned,
                splits=splits,
                state_dir=folder,
                executor=pool,
                key_bits=key_bits,
                allow_test_key=allow_test_key,
                seed=seed,
                host_seed=seed + 1,
                progress=_printer(say),
                decision=decision,
            )
            parts = {p: load_model(folder / p, job.job_id) for p in ("guest", "host")}
            kept = state_path(folder / "guest", "jobs", job.job_id, BEST_VALIDATION)
            val_scores = np.load(kept, allow_pickle=False) if kept.is_file() else None
            files = {p: read_files(part.folder) for p, part in parts.items()}
    result = run.result
    fitted = None if result.decision is None else Decision.from_json(result.decision)

    def scored(rows: np.ndarray, scores: np.ndarray | list[float] | None) -> pd.DataFrame:
        if scores is None or len(scores) != len(rows):
            return pd.DataFrame()
        frame = {
            id_column: g_frame[id_column].to_numpy()[g_rows[rows]],
            label: labels[rows],
            "score": np.asarray(scores, dtype=np.float64),
        }
        return _decided(pd.DataFrame(frame), fitted)

    out = VerticalModel(
        model_id=job.job_id,
        encrypted=job.encrypted,
        psi=psi,
        rows=Rows(
            train=len(splits.train), validation=len(splits.validation), test=len(splits.test)
        ),
        history=tuple(result.history),
        best_epoch=result.best_epoch,
        test=dict(result.test),
        test_scores=scored(splits.test, result.test_scores),
        seconds=run.seconds,
        label=label,
        id_column=id_column,
        id_type=kind,
        guest=parts["guest"],
        host=parts["host"],
        public_key=run.public_key,
        files=files,
        classes=names,
        decision=fitted,
        test_calibrated=dict(result.test_calibrated),
        validation_scores=scored(splits.validation, val_scores),
    )
    say(repr(out))
    return out


def default_batch(train_rows: int) -> int:
    """Rows per step when none is given: 256 from 4,096 training rows on, else 64.

    Measured by ``benchmarks/defaults.py`` (selection on validation rows only): batch 256
    holds on credit and the fraud-like set (with 64, validation peaked after the first
    epoch), while a table as small as breast (409 training rows) needs more than one step
    per epoch and does best with 64.
    """
    return 256 if train_rows >= 4096 else 64


def _decided(frame: pd.DataFrame, decision: Decision | None) -> pd.DataFrame:
    """``frame`` with the calibrated ``probability`` and the ``decision`` (bool) of its raw
    ``score`` column, when there is a ``decision``."""
    if decision is None:
        return frame
    scores = frame["score"].to_numpy(dtype=np.float64)
    return frame.assign(probability=decision.calibrate(scores), decision=decision.decide(scores))


def _text_columns(spec: FeatureSpec | None) -> tuple[str, ...]:
    """The columns a CSV file must be read as text: categories and dates."""
    return () if spec is None else (*spec.categorical_columns, *spec.date_columns)


def _config(model: TrainConfig | None, protect: ProtectConfig | None, seed: int) -> TrainConfig:
    config = model or TrainConfig()
    if config.task is not Task.BINARY:
        raise ConfigError(f"fit_vertical trains a binary model; model.task is {config.task.value}")
    if protect is not None and config.protect != TrainConfig().protect:
        raise ConfigError("give the label protection once, as protect=, not in model.protect")
    return dataclasses.replace(config, protect=protect or config.protect, seed=seed)


def _printer(say: Callable[[str], None]) -> Callable[[Progress], None]:
    """Each epoch's validation metrics, and training steps at most every 15 s."""
    last = [time.monotonic()]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.validation is not None:
            auc = p.validation.get("roc_auc")
            shown = "" if auc is None else f", validation AUC {auc:.4f}"
            say(f"epoch {p.epoch + 1}/{p.epochs}: training loss {p.loss:.4f}{shown}")
            last[0] = now
        elif now - last[0] >= 15.0:
            say(f"  step {p.step}/{p.total_steps}: {p.rows_per_s:.0f} rows/s, ETA {p.eta_s:.0f} s")
            last[0] = now

    return report
