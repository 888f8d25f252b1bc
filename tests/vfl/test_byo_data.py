"""Bringing one's own data to a split-NN job (issue 19): the job file's feature sections, the
host's own features and checks, what a refusal tells the guest, ``vfl data check`` and
``vfl report`` (docs/protocol.md §4.4.3, docs/bring-your-own-data.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import ConfigError, DataError, JobRefusedError
from psi.canon import DuplicatePolicy
from tests.vfl.session_setup import run_job, synthetic_tables, trio
from tests.vfl.test_accept import BASE, job
from vfl.common.decision import Calibration
from vfl.common.seeds import RunSeeds, job_scope, local_secret
from vfl.config import PartyConfig, parse_config
from vfl.data.checks import checked_data
from vfl.data.features import Encoding, FeatureSpec
from vfl.data.preprocess import Preprocessor, widest
from vfl.data.tables import TableSpec, load_table
from vfl.service.datacheck import check_alias_data, check_job_data
from vfl.service.drivers.splitnn import host_features
from vfl.splitnn.jobfile import load_job_file, parse_job

REPO = Path(__file__).resolve().parents[2]

JOB = """
[job]
guest_data = "bank"
host_data = "shop"
label_column = "fraud"
classes = ["no", "yes"]
seed = 42
[guest]
exclude_columns = ["note"]
categorical = {city = "frequency", segment = "onehot"}
date_columns = ["opened"]
[decision]
calibration = "isotonic"
threshold = "f_beta"
beta = 2.0
"""


def host_config(tmp_path: Path, extra: str = "") -> PartyConfig:
    text = BASE.format(me="retailer", role="host", other="arbiter", other_role="arbiter")
    text += '\n[data]\nshop = "shop.csv"\n' + extra
    return parse_config(tomllib.loads(text), source=tmp_path / "retailer.toml")


def guest_text() -> str:
    text = BASE.format(me="bank", role="guest", other="retailer", other_role="host")
    head, peers = text.split("[[peers]]", 1)
    peers = peers.replace('id = "bank"\nrole = "guest"', 'id = "arbiter"\nrole = "arbiter"')
    return head + "[[peers]]" + peers + '\n[data]\nbank = "bank.csv"\n'


def guest_config(tmp_path: Path) -> PartyConfig:
    return parse_config(tomllib.loads(guest_text()), source=tmp_path / "bank.toml")


def bank_csv(tmp_path: Path, *, bad: bool = False) -> Path:
    rng = np.random.default_rng(0)
    n = 40
    frame = pd.DataFrame(
        {
            "id": [str(1000 + i) for i in range(n)],
            "fraud": ["yes" if i % 7 == 0 else "no" for i in range(n)],
            "income": rng.normal(50, 10, n).round(2),
            "city": rng.choice(["Lyon", "Paris", "Nice"], n),
            "segment": rng.choice(["a", "b"], n),
            "opened": [f"2020-0{1 + i % 9}-1{i % 10}" for i in range(n)],
            "note": ["free text"] * n,
        }
    )
    if bad:
        frame["income"] = frame["income"].astype(object)
        frame.loc[10, "income"] = "unknown"  # line 12 in an editor
        frame.loc[20, "income"] = 1e300
    path = tmp_path / "bank.csv"
    frame.to_csv(path, index=False)
    return path


def test_the_job_file_carries_features_classes_decision_and_seed(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    parsed = load_job_file(path)
    assert parsed.classes == ("no", "yes") and parsed.seed == 42
    assert parsed.guest_features.encoding("city") is Encoding.FREQUENCY
    assert parsed.guest_features.date_columns == ("opened",)
    assert parsed.decision.calibration is Calibration.ISOTONIC and parsed.decision.beta == 2.0
    assert parsed.host_features is None
    again = parse_job(parsed.to_json(), source="canonical")
    assert again == parsed  # the canonical JSON round-trips
    assert "seed" not in json.dumps(parsed.job.host_part())  # the seed is never sent


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[job]\nguest_data="b"\nhost_data="s"\nclasses=["a","b","c"]', "classes lists 3 values"),
        ('[job]\nguest_data="b"\nhost_data="s"\nclasses=["a","a"]', "name a value twice"),
        ('[job]\nguest_data="b"\nhost_data="s"\n[guest]\nimpute="mean"', "[job] impute"),
        ('[job]\nguest_data="b"\nhost_data="s"\n[guest]\ncolour=1', "colour"),
        ('[job]\nguest_data="b"\nhost_data="s"\n[decision]\ntarget_fpr=2.0', "target_fpr"),
    ],
)
def test_a_bad_job_file_names_its_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        load_job_file(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_the_host_applies_its_own_features_unless_it_lets_guests_choose(tmp_path: Path) -> None:
    own = host_config(tmp_path, '[features.shop]\nexclude_columns = ["internal"]\n')
    assert host_features(own, {"data": "shop"}).exclude_columns == ("internal",)
    asked = {"data": "shop", "features": FeatureSpec(feature_columns=("x0",)).to_json()}
    with pytest.raises(JobRefusedError) as err:
        host_features(own, asked)
    assert err.value.public is not None and "chooses its own feature columns" in err.value.public
    allowing = host_config(tmp_path, "[accept]\nguest_features = true\n")
    assert host_features(allowing, asked).feature_columns == ("x0",)
    with pytest.raises(ConfigError, match="not an alias"):
        host_config(tmp_path, "[features.other]\n")


def test_a_host_column_named_like_the_label_is_refused_without_its_path(tmp_path: Path) -> None:
    """The host's checks refuse a feature named like the job's label column; the reason a
    guest may be told names no path, column or count; the report stays in the host's folder
    and its log warns about every binary column."""
    shop = tmp_path / "shop.csv"
    pd.DataFrame(
        {"id": ["1", "2", "3", "4"], "spend": [1.0, 2.5, 3.0, 4.0], "fraud": [0, 1, 0, 1]}
    ).to_csv(shop, index=False)
    spec = TableSpec(path=shop, id_column="id", label_like="fraud")
    report = tmp_path / "jobs" / "j" / "data_check.json"
    with pytest.raises(DataError) as err:
        checked_data(spec, warn_binary=True, report=report)
    assert "'fraud'" in str(err.value) and "label" in str(err.value)
    public = err.value.public or ""
    assert str(tmp_path) not in public and "fraud" not in public and "shop" not in public
    assert report.stat().st_mode & 0o777 == 0o600
    assert json.loads(report.read_text())["findings"]
    listed = TableSpec(
        path=shop, id_column="id", label_like="fraud", features=FeatureSpec(("spend", "fraud"))
    )
    checks = checked_data(listed, warn_binary=True, report=None)  # listed explicitly: allowed
    assert any("binary" in f.message for f in checks.warnings)


def test_a_hosts_data_refusal_points_at_its_data_not_at_a_policy(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    """A job the host refuses because its own data failed a check: the guest's error says so
    and points at the host's report, without the host's path or an [accept] hint."""
    guest, host, splits = synthetic_tables(rows=64)

    def broken(_: dict[str, Any]) -> Any:
        raise DataError(
            "/srv/shop/secret.csv line 12, column 'spend': not a number",
            public="its data failed a check (the report stays with its operator)",
        )

    out = run_job(
        trio(tmp_path, pk, sk), job(), guest, host, splits, host_kwargs={"table_for": broken}
    )
    refused = [
        e for e in out.errors if isinstance(e, JobRefusedError) and "retailer refused" in str(e)
    ]
    assert refused and out.result is None
    text = str(refused[0])
    assert "its own data failed a check" in text and "vfl data check" in text
    assert "/srv/shop" not in text and "spend" not in text and "[accept]" not in text


def test_data_check_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    bank_csv(tmp_path, bad=True)
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    report = check_job_data(config=guest_config(tmp_path), job=path)
    assert not report.ok
    text = report.render()
    assert "bank.csv:12: column 'income'" in text  # 1-based, as an editor counts
    assert "1e+300" in text  # the largest magnitude is named
    assert "categorical" in text  # and what to do about text in a numeric column
    shop = tmp_path / "shop.csv"
    pd.DataFrame({"id": ["1.0", "2.0"], "flag": [0, 1], "v": [0.5, 0.7]}).to_csv(shop, index=False)
    host = check_alias_data(config=host_config(tmp_path), alias="shop", label_column="flag")
    rendered = host.render()
    assert "decimal numbers" in rendered and "label" in rendered


def test_vfl_data_check_and_report_from_the_command_line(tmp_path: Path) -> None:
    """``vfl data check`` exits 1 on an error and 0 on clean data; ``vfl report`` names the
    folder of a finished job's report."""
    bank_csv(tmp_path)
    (tmp_path / "job.toml").write_text(JOB)
    (tmp_path / "bank.toml").write_text(guest_text())
    report = tmp_path / "state" / "jobs" / "j1" / "report"
    report.mkdir(parents=True)
    (report / "report.json").write_text(json.dumps({"metrics": {"joint": {"roc_auc": 0.9}}}))
    script = (
        "import sys; from vfl.cli import main; "
        "codes = [main(a.split()) for a in sys.argv[1:]]; print('codes', codes)"
    )
    calls = [
        f"data check --config {tmp_path / 'bank.toml'} --job {tmp_path / 'job.toml'}",
        f"report j1 --config {tmp_path / 'bank.toml'}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", script, *calls],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "codes [0, 0]" in done.stdout, done.stdout + done.stderr
    assert "0 errors" in done.stdout and str(report) in done.stdout and "0.9" in done.stdout
    bank_csv(tmp_path, bad=True)
    done = subprocess.run(
        [sys.executable, "-m", "vfl", *calls[0].split()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "bank.csv:12" in done.stdout


def test_seeded_draws_are_scoped_to_the_job_and_keyed_by_an_owner_only_secret(
    tmp_path: Path,
) -> None:
    """docs/protocol.md §4.4.2: one seed gives other draws in another job (scope) and at
    another installation (secret); the secret is made once, even by concurrent first uses,
    and a copy others may read is refused."""
    state = tmp_path / "state"
    with ThreadPoolExecutor(8) as pool:
        secrets_made = set(pool.map(lambda _: local_secret(state), range(16)))
    assert len(secrets_made) == 1 and (state / "seed.key").stat().st_mode & 0o777 == 0o600
    one = RunSeeds.at(state, 7, scope=job_scope({"model": "a"}))
    assert one.integer("w0") == RunSeeds.at(state, 7, scope=job_scope({"model": "a"})).integer("w0")
    assert one.integer("w0") != RunSeeds.at(state, 7, scope=job_scope({"model": "b"})).integer("w0")
    assert one.integer("w0") != RunSeeds.at(tmp_path / "other", 7, scope=one.scope).integer("w0")
    (state / "seed.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        local_secret(state)


def test_a_guest_chosen_host_spec_cannot_lift_the_hosts_own_limits(tmp_path: Path) -> None:
    config = host_config(
        tmp_path,
        '[features.shop]\nexclude_columns = ["internal"]\n[accept]\nguest_features = true\n',
    )

    def asked(**spec: Any) -> dict[str, Any]:
        return {"data": "shop", "label_column": "fraud", "features": FeatureSpec(**spec).to_json()}

    spec = host_features(config, asked(exclude_columns=("x9",)))
    assert set(spec.exclude_columns) == {"x9", "internal"}  # its own exclusions hold
    for bad in (asked(feature_columns=("internal",)), asked(feature_columns=("x0", "fraud"))):
        with pytest.raises(JobRefusedError):
            host_features(config, bad)


def test_the_hosts_size_check_does_not_depend_on_the_rows_the_guest_chose(
    tmp_path: Path,
) -> None:
    """The one-hot width fitted on FIT_ROWS would tell the guest whether two customers share
    a category; the host's offer counts the widest encoding instead (§4.4.3)."""
    shop = tmp_path / "shop.csv"
    pd.DataFrame(
        {"id": [str(i) for i in range(6)], "city": list("aabbcc"), "v": np.arange(6.0)}
    ).to_csv(shop, index=False)
    spec = TableSpec(path=shop, features=FeatureSpec(categorical=(("city", Encoding.ONEHOT),)))
    table = load_table(spec)
    fitted = {
        len(Preprocessor.fit(table, np.array(rows)).output_columns) for rows in ([0, 1], [0, 2])
    }
    assert len(fitted) == 2  # what a fitted width would reveal ...
    assert widest(table) == 1 + 20  # ... and what the host's size check uses instead


def test_repeated_ids_follow_the_psi_duplicates_policy(tmp_path: Path) -> None:
    shop = tmp_path / "shop.csv"
    pd.DataFrame({"id": ["1", "1", "2"], "v": [1.0, 2.0, 3.0]}).to_csv(shop, index=False)
    spec = TableSpec(path=shop)
    with pytest.raises(DataError, match="the same id as line 2"):
        checked_data(spec, warn_binary=False, report=None)
    checks = checked_data(spec, warn_binary=False, report=None, duplicates=DuplicatePolicy.FIRST)
    assert checks.ok
