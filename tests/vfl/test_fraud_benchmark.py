"""benchmarks/fraud.py: its data preparation and local baselines, cheaply (no protocol run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from vfl.common.decision import Calibration
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import split_rows

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fraud_bench", ROOT / "benchmarks" / "fraud.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fraud_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fb = _load()


def test_the_data_has_rare_positives_and_encoded_text_and_date_columns() -> None:
    data = fb.load_data()
    y = data.labels
    assert len(y) == 23_841 and int(y.sum()) == 477
    assert list(data.guest.ids) == list(data.host.ids)  # the same customers, same order
    splits = split_rows(y, test_fraction=0.2, validation_fraction=0.2, seed=0)
    guest = Preprocessor.fit(data.guest, splits.train).output_columns
    host = Preprocessor.fit(data.host, splits.train).output_columns
    assert {"bill_band=none", "bill_band=<other>", "opened:age_days", "opened:month"} <= set(guest)
    assert {"age_band=18-25", "age_band=<other>"} <= set(host)
    assert not any(c.startswith(("bill_band", "opened")) for c in host)
    x = Preprocessor.fit(data.guest, splits.train).transform(data.guest)
    run = fb.local_run(
        data,
        "guest_only",
        x,
        (splits.train, splits.validation, splits.test),
        "balanced",
        0,
        epochs=1,
    )
    assert run.test_scores.shape == (len(splits.test),) and run.epochs_run == 1
    assert np.all((run.val_scores >= 0) & (run.val_scores <= 1))
    for calibration in (Calibration.PLATT, Calibration.ISOTONIC):
        brier = fb.cv_brier(calibration, y[run.val_rows], run.val_scores, seed=0)
        assert 0 < brier < 0.25
