"""Learning and running jobs: data, models, services, CLI; and the public Python API.

Every party of a job simulated in this process, on DataFrames (:mod:`vfl.simulate`)::

    import vfl
    guest, host = vfl.datasets.breast()
    model = vfl.fit_vertical(guest=guest, host=host, label="y", id_column="id", epochs=3)
    print(model.evaluate())
    print(model.predict(guest=guest.head(), host=host.head()))

Running services (each party its own ``vfl serve``), as the party's own operator::

    client = vfl.Client(config="bank.toml")
    job_id = client.submit(job="job.toml")
    print(client.wait(job_id))

The names below load on first use, so ``import vfl`` stays light for the CLI, the services
and worker processes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.errors import ConfigError, DataError, VflError
    from psi.canon import IdType
    from vfl import datasets
    from vfl.client import Client
    from vfl.common.decision import DecisionConfig
    from vfl.data.features import FeatureSpec
    from vfl.privacy.dp import DPConfig
    from vfl.privacy.label_protection import ProtectConfig, ProtectMode
    from vfl.simulate import (
        HorizontalModel,
        TransferModel,
        VerticalModel,
        fit_horizontal,
        fit_transfer,
        fit_vertical,
    )
    from vfl.splitnn.training import TrainConfig
    from vfl.transfer.session import FtlJob

_SOURCES = {
    "Client": "vfl.client",
    "fit_vertical": "vfl.simulate",
    "fit_horizontal": "vfl.simulate",
    "fit_transfer": "vfl.simulate",
    "VerticalModel": "vfl.simulate",
    "HorizontalModel": "vfl.simulate",
    "TransferModel": "vfl.simulate",
    "TrainConfig": "vfl.splitnn.training",
    "FeatureSpec": "vfl.data.features",
    "DecisionConfig": "vfl.common.decision",
    "ProtectConfig": "vfl.privacy.label_protection",
    "ProtectMode": "vfl.privacy.label_protection",
    "DPConfig": "vfl.privacy.dp",
    "FtlJob": "vfl.transfer.session",
    "IdType": "psi.canon",
    "VflError": "protocols.errors",
    "ConfigError": "protocols.errors",
    "DataError": "protocols.errors",
}

__all__ = [
    "Client",
    "ConfigError",
    "DPConfig",
    "DataError",
    "DecisionConfig",
    "FeatureSpec",
    "FtlJob",
    "HorizontalModel",
    "IdType",
    "ProtectConfig",
    "ProtectMode",
    "TrainConfig",
    "TransferModel",
    "VerticalModel",
    "VflError",
    "datasets",
    "fit_horizontal",
    "fit_transfer",
    "fit_vertical",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use."""
    if name == "datasets":
        return importlib.import_module("vfl.datasets")
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'vfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
