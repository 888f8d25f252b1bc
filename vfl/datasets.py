"""The bundled real data sets as pandas DataFrames, for examples and experiments.

Vertical (two silos hold different columns of the same customers): :func:`breast` (569
customers), :func:`credit` (30,000) and :func:`fraud` (the credit customers with rare
positives, plus text and date columns). The guest's frame has ``id``, the label ``y`` and its
features ``x0, x1, ...``; the host's has ``id`` and its own features. Both hold every id, so
:func:`partial_overlap` samples a realistic partial overlap for the PSI to find.

Horizontal (clients hold the same columns of different customers): :func:`breast_horizontal`
and :func:`credit_horizontal` return each client's frame and a held-out test frame.

Transfer (a labelled guest and a host with other columns share only some customers):
:func:`credit_transfer`.

The files are copies of the FATE project's example data (UCI Breast Cancer Wisconsin and UCI
"default of credit card clients"), found by :mod:`vfl.data.datasets` (``$VFL_DATA_DIR``
overrides the folder) and checked against their sha256 before they are read.

Examples
--------
>>> import vfl
>>> guest, host = vfl.datasets.breast()
>>> list(guest.columns[:3]), len(host)
(['id', 'y', 'x0'], 569)
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from protocols.errors import ConfigError, DataError
from vfl.data.datasets import data_dir, verify
from vfl.transfer.scenario import build_scenario

ID_COLUMN = "id"
LABEL_COLUMN = "y"

# default_credit's columns are standardised (population mean and sd of the UCI columns); these
# undo it for the columns :func:`fraud` derives text and dates from.
AGE = ("x4", 35.4855, 9.217904)  # host: AGE in years
LIMIT = ("x0", 167484.322667, 129747.661567)  # host: LIMIT_BAL in NT dollars
BILL = ("x1", 51223.3309, 73635.860576)  # guest: BILL_AMT1, the latest statement
AGE_BANDS = ((25, "18-25"), (35, "26-35"), (45, "36-45"), (55, "46-55"), (200, "56+"))
BILL_BANDS = ((0.0, "none"), (10_000.0, "low"), (50_000.0, "mid"), (np.inf, "high"))
OPENED_BEFORE = np.datetime64("2005-09-30")  # the last month of the UCI data


def read(name: str) -> pd.DataFrame:
    """One data set by its file name (e.g. ``"breast_hetero_guest.csv"``), ids as text.

    Raises
    ------
    DataError
        If the file is missing or differs from its listed sha256 (the message says where
        the files are looked for and how to point ``VFL_DATA_DIR`` elsewhere).
    """
    path = verify(name, folder=data_dir(os.environ)).path
    return pd.read_csv(path, dtype={ID_COLUMN: str})


def breast() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The vertical breast-cancer data: 569 customers, guest ``id, y, x0..x9``, host
    ``id, x0..x19`` (``y`` = 1: benign).

    Examples
    --------
    >>> guest, host = breast()
    >>> guest.shape, host.shape
    ((569, 12), (569, 21))
    """
    return read("breast_hetero_guest.csv"), read("breast_hetero_host.csv")


def credit() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The vertical credit-default data: 30,000 card holders, guest ``id, y, x0..x12``,
    host ``id, x0..x9`` (``y`` = 1: default next month).

    Examples
    --------
    >>> guest, host = credit()
    >>> guest.shape, host.shape
    ((30000, 15), (30000, 11))
    """
    return read("default_credit_hetero_guest.csv"), read("default_credit_hetero_host.csv")


def fraud(*, positive_rate: float = 0.02, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fraud-like vertical data set: :func:`credit` with rare positives and non-numeric
    columns, as real silos hold them.

    The positives (``y`` = 1) of the 30,000 card holders are subsampled at random so that
    they make ``positive_rate`` of the rows; every negative is kept (23,364 of them, so the
    default 2 % keeps 477 positives: 23,841 rows). Both frames hold every id of the
    subsample, in the files' order; use :func:`partial_overlap` for a partial overlap.

    Columns (all of :func:`credit`'s numeric columns are kept, so the data set without its
    three added columns is the credit data subsampled):

    * guest: ``id, y, x0..x12`` (``x0`` the repayment status of the oldest month, ``x1..x6``
      the six monthly bill amounts, ``x7..x12`` the six payments), then

      - ``bill_band`` (text): the latest bill ``x1`` binned: ``"none"`` (≤ 0), ``"low"``
        (≤ 10,000 NT$), ``"mid"`` (≤ 50,000), ``"high"``;
      - ``opened`` (text, ISO ``YYYY-MM-DD``): when the account was opened, 2005-09-30 minus
        a tenure of ``(age − 20) · (0.1 + 0.3·q + 0.3·u)`` years, where ``q`` is the
        customer's quantile of the credit limit and ``u`` a seeded uniform draw per
        customer; older customers with higher limits have older accounts, so the column
        carries a little signal;

    * host: ``id, x0..x9`` (``x0`` the credit limit, ``x1`` sex, ``x2`` education, ``x3``
      marital status, ``x4`` age, ``x5..x9`` the repayment status of the five later
      months), then ``age_band`` (text): ``x4`` in years binned as ``"18-25"``,
      ``"26-35"``, ``"36-45"``, ``"46-55"``, ``"56+"``.

    The numeric columns are standardised as in the bundled files (FATE's copy of the UCI
    data); the text columns are derived from the values they stand for.

    Parameters
    ----------
    positive_rate
        The positives' share of the rows, in ``(0, 0.2212]`` (0.2212: all of them, the
        credit data's own rate).
    seed
        Seeds the choice of positives and the tenure draws; the same arguments give the
        same frames. A customer's ``opened`` date does not depend on ``positive_rate``.

    Returns
    -------
    guest, host
        The guest's frame (``id``, ``y``, its features) and the host's (``id``, its
        features), with the same ids.

    Raises
    ------
    ConfigError
        If ``positive_rate`` is outside ``(0, 0.2212]`` or keeps no positive.

    Examples
    --------
    >>> guest, host = fraud()
    >>> guest.shape, host.shape, round(float(guest["y"].mean()), 4)
    ((23841, 17), (23841, 12), 0.02)
    >>> guest[["bill_band", "opened"]].iloc[0].tolist(), host["age_band"].iloc[0]
    (['mid', '2000-11-30'], '46-55')
    """
    guest, host = credit()
    if not (guest[ID_COLUMN].to_numpy() == host[ID_COLUMN].to_numpy()).all():
        raise DataError("the credit data's guest and host files list their ids in another order")
    rng = np.random.default_rng(seed)
    tenure_draw = rng.random(len(guest))  # one per customer, before the subsample
    labels = guest[LABEL_COLUMN].to_numpy()
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    top = round(positives.size / labels.size, 4)
    keep = 0
    if 0 < positive_rate <= top:
        keep = min(round(positive_rate / (1 - positive_rate) * negatives.size), positives.size)
    if keep < 1:
        raise ConfigError(
            f"positive_rate = {positive_rate}: it must lie in (0, {top}] and keep at least one "
            "positive"
        )
    chosen = rng.choice(positives, keep, replace=False)
    rows = np.sort(np.concatenate([negatives, chosen]))

    def original(frame: pd.DataFrame, column: tuple[str, float, float]) -> np.ndarray:
        name, mean, sd = column
        values: np.ndarray = frame[name].to_numpy(dtype=np.float64) * sd + mean
        return values

    age = np.round(original(host, AGE))
    limit = original(host, LIMIT)
    quantile = (np.argsort(np.argsort(limit, kind="stable"), kind="stable") + 0.5) / limit.size
    years = np.maximum(age - 20, 0.25) * (0.1 + 0.3 * quantile + 0.3 * tenure_draw)
    opened = OPENED_BEFORE - np.round(years * 365.25).astype("timedelta64[D]")
    guest = guest.assign(
        bill_band=_bands(original(guest, BILL), BILL_BANDS),
        opened=np.datetime_as_string(opened, unit="D").astype(object),
    )
    host = host.assign(age_band=_bands(age, AGE_BANDS))
    return guest.iloc[rows].reset_index(drop=True), host.iloc[rows].reset_index(drop=True)


def _bands(values: np.ndarray, bands: tuple[tuple[float, str], ...]) -> np.ndarray:
    """The name of each value's band: the first ``(upper, name)`` with ``value <= upper``."""
    uppers = np.array([upper for upper, _ in bands], dtype=np.float64)
    names = np.array([name for _, name in bands], dtype=object)
    out: np.ndarray = names[np.searchsorted(uppers, values, side="left")]
    return out


def breast_horizontal() -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The horizontal breast-cancer data: clients ``guest`` (227 rows) and ``host`` (228),
    a test frame (114); every frame has ``id, y, x0..x29``.

    Examples
    --------
    >>> clients, test = breast_horizontal()
    >>> sorted(clients), len(test)
    (['guest', 'host'], 114)
    """
    clients = {"guest": read("breast_homo_guest.csv"), "host": read("breast_homo_host.csv")}
    return clients, read("breast_homo_test.csv")


def credit_horizontal() -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The horizontal credit-default data: clients ``guest``, ``host1`` and ``host2``
    (8,000 rows each) and a test frame (6,000); every frame has ``id, y, x0..x22``.

    Examples
    --------
    >>> clients, test = credit_horizontal()
    >>> sorted(clients), len(test)
    (['guest', 'host1', 'host2'], 6000)
    """
    clients = {
        "guest": read("default_credit_homo_guest.csv"),
        "host1": read("default_credit_homo_host_1.csv"),
        "host2": read("default_credit_homo_host_2.csv"),
    }
    return clients, read("default_credit_homo_test.csv")


def credit_transfer(
    *, guest_rows: int = 3000, host_rows: int = 2000, overlap: int = 500, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """A transfer-learning split of the credit data: the guest (``id, y, x0..x12``) and
    the host (``id, x0..x9``, no label) share ``overlap`` customers.

    Returns
    -------
    guest, host, host_labels
        The two frames, and the true label of each host row indexed by id, for evaluation
        only (a real host has no labels).

    Examples
    --------
    >>> guest, host, host_labels = credit_transfer(guest_rows=600, host_rows=400, overlap=200)
    >>> len(set(guest["id"]) & set(host["id"]))
    200
    """
    scenario = build_scenario(
        data_dir=data_dir(os.environ),
        guest_rows=guest_rows,
        host_rows=host_rows,
        overlap=overlap,
        seed=seed,
    )
    return scenario.guest, scenario.host, scenario.host_labels


def partial_overlap(
    guest: pd.DataFrame,
    host: pd.DataFrame,
    *,
    overlap: float = 0.8,
    id_column: str = ID_COLUMN,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two frames with only part of their common customers in both, rows shuffled.

    Of the ids both frames hold, ``round(overlap · count)`` stay in both; every other one is
    dropped from one side (alternately from the host's and the guest's frame), so each
    party also holds customers the other does not. Each frame's rows are then shuffled
    on their own, so only the ids can align them.

    Parameters
    ----------
    guest, host
        Frames with an id column.
    overlap
        The fraction of the common ids kept by both, in ``(0, 1]``.
    id_column
        The id column of both frames.
    seed
        Seed of the choice and of the shuffles.

    Examples
    --------
    >>> guest, host = partial_overlap(*breast(), overlap=0.5)
    >>> len(set(guest["id"]) & set(host["id"]))
    284
    """
    if not 0 < overlap <= 1:
        raise ConfigError(f"overlap = {overlap}: it must lie in (0, 1]")
    for side, frame in (("guest", guest), ("host", host)):
        if id_column not in frame.columns:
            raise DataError(f"the {side}'s frame has no id column {id_column!r}")
    rng = np.random.default_rng(seed)
    common = guest[id_column][guest[id_column].isin(host[id_column])].to_numpy()
    order = rng.permutation(len(common))
    kept = int(round(overlap * len(common)))
    dropped = common[order[kept:]]
    guest_only, host_only = dropped[0::2], dropped[1::2]  # dropped at the host, at the guest
    g = guest[~guest[id_column].isin(host_only)]
    h = host[~host[id_column].isin(guest_only)]
    g = g.iloc[rng.permutation(len(g))].reset_index(drop=True)
    h = h.iloc[rng.permutation(len(h))].reset_index(drop=True)
    return g, h
