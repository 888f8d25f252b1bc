"""The federated-transfer-learning benchmark scenario built from ``default_credit_hetero``.

The hetero guest and host files hold the same 30,000 customers. FTL needs a guest (source
domain: labels and guest columns) and a host (target domain: host columns, no labels) that
share only part of their customers. :func:`build_scenario` draws, with a fixed seed, three
disjoint id sets from the common ids: the overlap (in both parties), guest-only customers and
host-only customers. The host's true labels are kept apart in :attr:`TransferScenario.host_labels`
for evaluation only; they never go into the host's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from protocols.errors import ConfigError, DataError
from vfl.data.datasets import verify

GUEST_SOURCE = "default_credit_hetero_guest.csv"
HOST_SOURCE = "default_credit_hetero_host.csv"
ID_COLUMN = "id"
LABEL_COLUMN = "y"


@dataclass(frozen=True)
class TransferScenario:
    """Guest and host tables of the FTL scenario, plus the host's labels for evaluation.

    Attributes
    ----------
    guest
        Columns ``id``, ``y`` and the guest feature columns (``x0`` .. ``x12``); one row per
        guest customer, in the order of the source file.
    host
        Columns ``id`` and the host feature columns (``x0`` .. ``x9``); no label column.
    host_labels
        The true label of every host row, indexed by id (same order as :attr:`host`). For
        evaluation only: never given to the host.
    overlap
        Number of customers held by both parties.
    """

    guest: pd.DataFrame
    host: pd.DataFrame
    host_labels: pd.Series
    overlap: int

    @property
    def overlap_ids(self) -> pd.Index:
        """Ids held by both parties, in host row order."""
        host_ids = pd.Index(self.host[ID_COLUMN])
        return host_ids[host_ids.isin(self.guest[ID_COLUMN])]

    @property
    def host_only_ids(self) -> pd.Index:
        """Ids held by the host only (the customers to score), in host row order."""
        host_ids = pd.Index(self.host[ID_COLUMN])
        return host_ids[~host_ids.isin(self.guest[ID_COLUMN])]

    @property
    def guest_only_ids(self) -> pd.Index:
        """Ids held by the guest only, in guest row order."""
        guest_ids = pd.Index(self.guest[ID_COLUMN])
        return guest_ids[~guest_ids.isin(self.host[ID_COLUMN])]


def _read(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={ID_COLUMN: str})
    if ID_COLUMN not in frame.columns:
        raise DataError(f"{path} has no {ID_COLUMN!r} column (columns: {list(frame.columns)})")
    if frame[ID_COLUMN].isna().any() or frame[ID_COLUMN].duplicated().any():
        raise DataError(f"{path}: ids must be present and unique")
    return frame


def build_scenario(
    *,
    data_dir: Path,
    guest_rows: int = 18_000,
    host_rows: int = 15_000,
    overlap: int = 3_000,
    seed: int = 0,
) -> TransferScenario:
    """Split the common customers of ``default_credit_hetero`` into an FTL guest and host.

    Parameters
    ----------
    data_dir
        Folder of the data sets (``vfl.data.datasets.data_dir(os.environ)``); the two source
        files are checked against their sha256 first.
    guest_rows
        Number of guest customers (overlap included).
    host_rows
        Number of host customers (overlap included).
    overlap
        Number of customers in both parties.
    seed
        Seed of the ``numpy.random.Generator`` that picks the three disjoint id sets (one
        permutation of the common ids: the first ``overlap`` are shared, the next
        ``guest_rows - overlap`` guest-only, the next ``host_rows - overlap`` host-only).

    Returns
    -------
    TransferScenario
        Rows keep their original (string) ids and the order of the source files.

    Raises
    ------
    ConfigError
        If a size is negative, the overlap exceeds a party's size, or
        ``guest_rows + host_rows - overlap`` exceeds the number of common customers.
    DataError
        If a source file is missing, modified, or lacks the expected columns.
    """
    if min(guest_rows, host_rows, overlap) < 0:
        raise ConfigError(
            f"sizes must be non-negative: guest_rows={guest_rows}, host_rows={host_rows}, "
            f"overlap={overlap}"
        )
    if overlap > min(guest_rows, host_rows):
        raise ConfigError(
            f"overlap={overlap} exceeds a party's size (guest_rows={guest_rows}, "
            f"host_rows={host_rows})"
        )

    guest_src = _read(verify(GUEST_SOURCE, folder=data_dir).path)
    host_src = _read(verify(HOST_SOURCE, folder=data_dir).path)
    if LABEL_COLUMN not in guest_src.columns:
        raise DataError(f"{GUEST_SOURCE} has no label column {LABEL_COLUMN!r}")
    if LABEL_COLUMN in host_src.columns:
        raise DataError(f"{HOST_SOURCE} unexpectedly holds a label column {LABEL_COLUMN!r}")

    common = guest_src[ID_COLUMN][guest_src[ID_COLUMN].isin(host_src[ID_COLUMN])].to_numpy()
    available = len(common)
    needed = guest_rows + host_rows - overlap
    if needed > available:
        raise ConfigError(
            f"guest_rows + host_rows - overlap = {guest_rows} + {host_rows} - {overlap} = "
            f"{needed} customers needed, but only {available} ids are common to "
            f"{GUEST_SOURCE} and {HOST_SOURCE}"
        )

    order = np.random.default_rng(seed).permutation(available)
    shared = common[order[:overlap]]
    guest_only = common[order[overlap:guest_rows]]
    host_only = common[order[guest_rows:needed]]
    guest_ids = set(shared) | set(guest_only)
    host_ids = set(shared) | set(host_only)

    guest = guest_src[guest_src[ID_COLUMN].isin(guest_ids)].reset_index(drop=True)
    host = host_src[host_src[ID_COLUMN].isin(host_ids)].reset_index(drop=True)
    labels_by_id = guest_src.set_index(ID_COLUMN)[LABEL_COLUMN]
    host_labels = labels_by_id.loc[host[ID_COLUMN]].rename(LABEL_COLUMN)
    return TransferScenario(guest=guest, host=host, host_labels=host_labels, overlap=overlap)


def write_scenario(s: TransferScenario, folder: Path) -> dict[str, Path]:
    """Write the scenario as CSV files.

    Parameters
    ----------
    s
        The scenario.
    folder
        Output folder (created if missing).

    Returns
    -------
    dict[str, Path]
        ``"guest"`` -> ``guest.csv`` (id, y, guest columns), ``"host"`` -> ``host.csv`` (id,
        host columns, no label) and ``"host_truth"`` -> ``host_truth.csv`` (id, y of every host
        row), the last for evaluation only: do not hand it to the host.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "guest": folder / "guest.csv",
        "host": folder / "host.csv",
        "host_truth": folder / "host_truth.csv",
    }
    s.guest.to_csv(paths["guest"], index=False)
    s.host.to_csv(paths["host"], index=False)
    s.host_labels.rename_axis(ID_COLUMN).rename(LABEL_COLUMN).to_frame().to_csv(paths["host_truth"])
    return paths
