"""The public in-process API: every party of a federated job simulated in this process.

:func:`fit_vertical` (split NN), :func:`fit_horizontal` (FedAvg with secure aggregation)
and :func:`fit_transfer` (FTL) take pandas DataFrames (or CSV paths), run the engine's real
protocols (PSI, encryption, the arbiter) over in-memory channels and return a fitted model
with ``evaluate``, ``predict`` and ``save``. Data never leaves the process: this is for
trying models on data one holds in full, not for two silos (those run the party service).
"""

from vfl.simulate.common import PsiSummary
from vfl.simulate.horizontal import HorizontalModel, fit_horizontal
from vfl.simulate.transfer import TransferModel, fit_transfer
from vfl.simulate.vertical import Rows, VerticalModel, fit_vertical

__all__ = [
    "HorizontalModel",
    "PsiSummary",
    "Rows",
    "TransferModel",
    "VerticalModel",
    "fit_horizontal",
    "fit_transfer",
    "fit_vertical",
]
