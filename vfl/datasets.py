"""The bundled real data sets as pandas DataFrames, for examples and experiments.

Vertical (two silos hold different columns of the same customers): :func:`breast` (569
customers) and :func:`credit` (30,000). The guest's frame has ``id``, the label ``y`` and its
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
