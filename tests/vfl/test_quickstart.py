"""examples/quickstart.ipynb runs top to bottom and its results hold up.

The notebook's code cells are executed in order in one namespace (its JSON parsed here, no
Jupyter needed), with the notebook's own defaults: a local process pool, the real PSI, an
encrypted epoch under a 1024-bit test key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vfl.splitnn.saved import load_model

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def code_cells(path: Path) -> list[str]:
    """The source of every code cell, in order; a stored output fails (commit it clean)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        assert not cell["outputs"] and cell["execution_count"] is None, "outputs are stored"
    return ["".join(cell["source"]) for cell in cells]


@pytest.fixture(scope="module")
def namespace() -> Any:
    scope: dict[str, Any] = {"__name__": "quickstart"}
    for number, source in enumerate(code_cells(NOTEBOOK)):
        exec(compile(source, f"{NOTEBOOK.name} code cell {number}", "exec"), scope)  # noqa: S102
    yield scope
    scope["scratch"].cleanup()


def test_vertical_plaintext_and_encrypted(namespace: dict[str, Any]) -> None:
    model, encrypted = namespace["model"], namespace["encrypted"]
    guest, host = namespace["guest"], namespace["host"]
    common = len(set(guest["id"]) & set(host["id"]))
    assert model.psi.intersection == common == round(0.8 * 569)  # the PSI found the overlap
    assert model.evaluate()["roc_auc"] > 0.9
    assert not model.encrypted and encrypted.encrypted
    assert encrypted.evaluate()["roc_auc"] > 0.8  # one epoch
    assert encrypted.host.manifest["key_bits"] == 1024


def test_predictions_have_ids_and_probabilities(namespace: dict[str, Any]) -> None:
    predictions, guest, host = namespace["predictions"], namespace["guest"], namespace["host"]
    head = guest.head(10)
    expected = head["id"][head["id"].isin(host["id"])]
    assert list(predictions["id"]) == list(expected)  # the guest's order, matched ids only
    assert 0 < len(predictions) < 10  # partial overlap: some of the ten have no host row
    assert ((predictions["score"] >= 0) & (predictions["score"] <= 1)).all()


def test_saved_parts_are_owner_only_and_load(namespace: dict[str, Any]) -> None:
    model, saved = namespace["model"], namespace["saved"]
    files = [p for p in saved.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in saved.rglob("*") if p.is_dir())
    for party in ("guest", "host"):
        part = load_model(saved / party, model.model_id)
        assert part.manifest["role"] == party


def test_horizontal_and_transfer(namespace: dict[str, Any]) -> None:
    federated, test = namespace["federated"], namespace["test"]
    assert federated.evaluate(test)["roc_auc"] > 0.9
    assert len(federated.history) == 5
    transfer, target = namespace["transfer"], namespace["target"]
    scores = transfer.predict(host=target)
    assert list(scores["id"]) == list(target["id"])
    assert np.isfinite(scores["score"]).all() and scores["score"].between(0, 1).all()
    assert transfer.test_rows == round(0.2 * 150) and "roc_auc" in transfer.evaluate()
    # the shortcut Φ·u^B equals the scores the encrypted job computed (fixed point 2^-24)
    held = transfer.test_scores
    again = transfer.predict(host=target[target["id"].isin(held["id"])])
    by_id = dict(zip(again["id"], again["score"], strict=True))
    np.testing.assert_allclose([by_id[i] for i in held["id"]], held["score"], atol=1e-5)
