"""The service's drivers and typed requests: one driver per kind, registered once; a job file
parsed once into a typed job whose canonical JSON parses back to an equal one; admin requests
parsed once with errors that name the key; the runner and the party import no mode."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from protocols.errors import ConfigError, InsecureConfigError
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode
from vfl.common.jobfile import JobKind, TypedJob, canonical_json, job_kind
from vfl.config import JobType
from vfl.service.audit import config_digest
from vfl.service.driver import JobDriver
from vfl.service.drivers import DRIVERS, parse_job
from vfl.service.requests import (
    AdminCommand,
    JobIdRequest,
    PingRequest,
    PsiRequest,
    ScoreRequest,
    TrainRequest,
)
from vfl.service.runner import message_tags

ROOT = Path(__file__).resolve().parents[2]

SPLIT = {
    "job": {
        "id": "split-1",
        "guest_data": "credit",
        "host_data": "shop",
        "id_type": "email",
        "psi_job": "p1",
        "test_fraction": 0.25,
        "batch": 32,
        "epochs": 3,
        "mode": "p0",
        "impute": "mean",
    },
    "model": {"d": 4, "k": 3, "guest_widths": [8, 4], "host_widths": [6, 4], "dropout": 0.1},
    "protect": {"mode": "gaussian", "clip_norm": 2.0},
}
FEDAVG = {
    "job": {"type": "horizontal", "rounds": 5, "batch": 16, "on_dropout": "stop"},
    "clients": {"bank": "credit", "retailer": "credit", "shop": "other"},
    "model": {"widths": [16, 1], "optimizer": "sgd", "momentum": 0.5},
    "dp": {"noise_multiplier": 1.5, "max_grad_norm": 0.5},
}
FTL = {
    "job": {
        "type": "transfer",
        "id": "ftl-1",
        "guest_data": "labelled",
        "host_data": "customers",
        "score_owner": "guest",
        "epochs": 4,
    },
    "model": {"d": 6, "batch": 16, "guest_widths": [12], "host_lr": 0.01},
    "protect": {"mode": "gaussian", "noise": 0.5},
}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(SPLIT, JobKind.SPLIT_NN), (FEDAVG, JobKind.HORIZONTAL), (FTL, JobKind.TRANSFER)],
    ids=["split_nn", "horizontal", "transfer"],
)
def test_a_typed_job_round_trips_through_its_canonical_json(
    raw: dict[str, Any], kind: JobKind
) -> None:
    """Parsing the canonical JSON of a typed job gives an equal typed job; the JSON is
    canonical text (sorted, compact), names its kind, and its digest is config_sha256."""
    typed = parse_job(raw, source="job.toml", party_id="bank")
    assert typed.kind is kind and job_kind(typed.to_json()) is kind
    again = parse_job(typed.to_json(), source="request.json", party_id="bank")
    assert again == typed
    assert typed.canonical == canonical_json(json.loads(typed.canonical))
    assert typed.to_json()["job"]["type"] == kind.value
    assert typed.guest_data in ("credit", "labelled")
    request = TrainRequest(job=typed, hold_at_step=2)
    text = canonical_json(request.to_json())
    hashed = config_digest(json.loads(text))
    assert hashed == config_digest(request.to_json())
    back = TrainRequest.from_json(
        json.loads(text),
        parse_job=lambda raw, plain: parse_job(
            raw, source="r", party_id="bank", allow_plaintext=plain
        ),
    )
    assert back == request


def test_one_job_has_one_canonical_json_however_its_numbers_are_spelt() -> None:
    """``learning_rate = 1`` and ``= 1.0`` are one job with one digest; a lone surrogate a
    peer may send still has a canonical text (escaped), so digests never fail."""
    spelt = [
        {**SPLIT, "model": {"learning_rate": one, "eta_w": 0.1}, "protect": {"power_scale": s}}
        for one, s in ((1, 16), (1.0, 16.0))
    ]
    a, b = (parse_job(raw, source="job.toml", party_id="bank") for raw in spelt)
    assert a == b and a.canonical == b.canonical
    assert config_digest(a.to_json()) == config_digest(b.to_json())
    assert canonical_json({"id": "\ud800"}) == '{"id":"\\ud800"}'
    assert len(config_digest({"id": "\ud800"})) == 64


def test_values_drawn_at_parsing_are_kept_in_the_canonical_json() -> None:
    """A FedAvg job without an id or an initial-model seed gets both when it is parsed; the
    resubmitted (canonical) job keeps them, so it is the same job."""
    raw = {key: dict(value) for key, value in FEDAVG.items()}
    typed = parse_job(raw, source="job.toml", party_id="bank")
    assert typed.job_id.startswith("fedavg-")
    seed = typed.to_json()["model"]["init_seed"]
    again = parse_job(typed.to_json(), source="request.json", party_id="bank")
    assert again.job_id == typed.job_id and again.to_json()["model"]["init_seed"] == seed


def test_a_plaintext_split_job_needs_the_operators_flag() -> None:
    raw = {**SPLIT, "job": {**SPLIT["job"], "plaintext": True}}
    with pytest.raises(InsecureConfigError, match="--plaintext"):
        parse_job(raw, source="job.toml", party_id="bank")
    typed = parse_job(raw, source="job.toml", party_id="bank", allow_plaintext=True)
    with pytest.raises(InsecureConfigError):  # the canonical JSON keeps it plaintext
        parse_job(typed.to_json(), source="request.json", party_id="bank")


def test_one_driver_per_kind_registered_once() -> None:
    """Every kind a party's [accept] policy names has one driver; the job kinds of a job
    file are exactly the job drivers; the service accepts every tag a driver uses."""
    assert set(DRIVERS) == set(JobType)
    assert all(driver.kind is kind for kind, driver in DRIVERS.items())
    job_drivers = {kind for kind, driver in DRIVERS.items() if issubclass(driver, JobDriver)}
    assert {k.value for k in job_drivers} == {k.value for k in JobKind}
    tags = message_tags()
    assert len(tags) == len(set(tags))
    assert all(t in tags for driver in DRIVERS.values() for t in driver.tags)


def test_a_job_of_an_unknown_kind_is_named() -> None:
    with pytest.raises(ConfigError, match="type = 'vertical'"):
        parse_job({"job": {"type": "vertical"}}, source="j", party_id="bank")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": "credit"}, "peer must be a non-empty string"),
        ({"peer": "shop", "data": "credit", "mode": "all"}, "mode = 'all'; use one of"),
        ({"peer": "shop", "data": "credit", "pad_to": -1}, "pad_to must be a positive"),
        ({"peer": "shop", "data": "credit", "job_id": "../x"}, "PSI job id"),
        ({"peer": "shop", "data": "credit", "colour": "red"}, "unknown key(s) ['colour']"),
    ],
)
def test_admin_requests_are_parsed_once_with_errors_that_name_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        PsiRequest.from_json(data)


def test_typed_requests() -> None:
    psi = PsiRequest.from_json(
        {"peer": "shop", "data": "credit", "id_type": "email", "pad_to": None, "job_id": None}
    )
    assert psi.id_type is IdType.EMAIL and psi.mode is PsiMode.BOTH and psi.pad_to is None
    assert psi.duplicates is DuplicatePolicy.ERROR and psi.host_request() == {"data": "credit"}
    with_host = PsiRequest(peer="shop", data="a", host_data="b", host_id_column="cid")
    assert with_host.host_request() == {"data": "b", "id_column": "cid"}
    online = ScoreRequest.from_json({"model": "m", "data": "new", "ids": [1, "b"], "decoys": 2})
    assert online.ids == ("1", "b") and online.out is None and online.decoys == 2
    batch = ScoreRequest.from_json({"model": "m", "data": "new", "out": "/tmp/s.csv"})
    assert batch.ids is None and batch.out == Path("/tmp/s.csv")
    with pytest.raises(ConfigError, match=r"batch scoring needs an output file \(out\)"):
        ScoreRequest.from_json({"model": "m", "data": "new"})
    with pytest.raises(ConfigError, match="model"):
        ScoreRequest.from_json({"model": "a/b", "data": "new", "ids": ["x"]})
    assert PingRequest.from_json({}, max_bytes=1 << 20) == PingRequest()
    with pytest.raises(ConfigError, match="ping bytes must be an integer"):
        PingRequest.from_json({"bytes": 2 << 20}, max_bytes=1 << 20)
    assert JobIdRequest.from_json({"job_id": "j"}, command=AdminCommand.CANCEL).job_id == "j"
    with pytest.raises(ConfigError, match="cancel request: job_id"):
        JobIdRequest.from_json({"job_id": ""}, command=AdminCommand.CANCEL)
    with pytest.raises(ConfigError, match="hold_at_step must be a positive integer"):
        TrainRequest.from_json(
            {"job_file": SPLIT, "hold_at_step": 0},
            parse_job=lambda raw, plain: parse_job(raw, source="r", party_id="bank"),
        )


MODES = ("vfl.splitnn", "vfl.fedavg", "vfl.transfer", "vfl.scoring")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


@pytest.mark.parametrize(
    "module", ["runner", "party", "driver", "guestjob", "requests", "drivers/__init__"]
)
def test_the_runner_and_the_party_know_no_kind_of_job(module: str) -> None:
    """The service reaches the modes only through its drivers (and the helpers they use)."""
    imported = _imports(ROOT / "vfl" / "service" / f"{module}.py")
    assert not {m for m in imported if m.startswith(MODES)}, imported


def test_no_driver_imports_the_runner_or_another_driver() -> None:
    folder = ROOT / "vfl" / "service" / "drivers"
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        imported = _imports(path)
        assert "vfl.service.runner" not in imported, path
        assert not {m for m in imported if m.startswith("vfl.service.drivers")}, path


def test_typed_job_is_frozen() -> None:
    typed: TypedJob[Any] = parse_job(FTL, source="j", party_id="bank")
    with pytest.raises(AttributeError):
        typed.job_id = "other"  # type: ignore[misc]
