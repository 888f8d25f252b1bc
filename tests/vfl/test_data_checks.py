"""Bring your own data: the feature spec, the checks a table passes (one error at load, all of
them in a report), categorical and date features, and an empty PSI intersection."""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocols.errors import AlignmentError, ConfigError, DataError, peer_reason
from protocols.executor import InlineExecutor
from protocols.transport.base import MessageFilter
from psi.canon import DuplicatePolicy, IdType
from psi.inprocess import channel_pair
from psi.protocol import PsiTag
from tests.conftest import BANK, RETAILER
from vfl.config import parse_config
from vfl.data.checks import MAX_ABS, DataReport, Severity, check_table
from vfl.data.features import Encoding, FeatureSpec, ImputePolicy
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import PartyTable, TableSpec, frame_table, load_table
from vfl.service.alignment import answer_psi, run_psi
from vfl.service.requests import PsiRequest
from vfl.simulate.common import align, party_table


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "t.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def shop() -> pd.DataFrame:
    """Eight customers: a number, a category, a date and a binary label."""
    return pd.DataFrame(
        {
            "id": [f"c{i}" for i in range(8)],
            "y": [0, 1, 0, 1, 0, 1, 1, 0],
            "spend": [10.0, 12.5, 7.0, 30.0, 1.0, 2.0, 3.5, 9.0],
            "city": ["Paris", "Lyon", "Paris", "Nice", "Paris", "Lyon", "Brest", None],
            "opened": [
                "2024-01-01",
                "2024-01-31",
                "2023-12-25",
                "2024-02-29",
                "2024-02-01",
                "2024-01-15",
                "2024-03-10",
                "2024-02-20",
            ],
        }
    )


def spec(path: Path, **changes: Any) -> TableSpec:
    features = FeatureSpec(categorical=(("city", Encoding.ONEHOT),), date_columns=("opened",))
    return TableSpec(**({"path": path, "label_column": "y", "features": features} | changes))


# -- the feature spec ------------------------------------------------------------------------


def test_a_feature_spec_parses_both_forms_and_round_trips() -> None:
    listed = FeatureSpec.parse(
        {"categorical": ["region", "city"], "date_columns": ["opened"], "impute": "median"},
        where="job.toml [features]",
    )
    assert listed.categorical == (("city", Encoding.ONEHOT), ("region", Encoding.ONEHOT))
    assert listed.impute is ImputePolicy.MEDIAN and listed.feature_columns is None
    table = FeatureSpec.parse(
        {
            "feature_columns": ["spend", "city", "opened"],
            "categorical": {"city": "frequency"},
            "date_columns": ["opened"],
            "max_categories": 5,
        },
        where="w",
    )
    assert table.encoding("city") is Encoding.FREQUENCY and table.max_categories == 5
    for one in (listed, table, FeatureSpec()):
        again = json.loads(json.dumps(one.to_json()))
        assert FeatureSpec.parse(again, where="saved") == one
        assert set(again) == {
            "feature_columns",
            "exclude_columns",
            "categorical",
            "date_columns",
            "max_categories",
            "impute",
        }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"colums": ["a"]}, r"job.toml \[features\]: unknown key 'colums'"),
        ({"feature_columns": "a"}, "feature_columns must be a list of column names"),
        ({"categorical": {"a": "hash"}}, "categorical column 'a': the encoding must be one of"),
        ({"max_categories": 1}, "max_categories must be an integer from 2 to 1000"),
        ({"max_categories": 10**18}, "max_categories must be an integer from 2 to 1000"),
        ({"exclude_columns": ["c"] * 10_001}, "names more than 10000 columns"),
        ({"max_categories": True}, "max_categories must be an integer"),
        ({"impute": "guess"}, "impute must be one of"),
        ({"categorical": ["d"], "date_columns": ["d"]}, "'d' is both categorical and a date"),
        ({"feature_columns": ["a"], "exclude_columns": ["a"]}, "'a' is in exclude_columns and"),
        ({"date_columns": ["d", "d"]}, "date_columns names column 'd' twice"),
    ],
)
def test_a_bad_feature_spec_names_where_and_the_key(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        FeatureSpec.parse(raw, where="job.toml [features]")
    assert str(info.value).startswith("job.toml [features]: ")


# -- ids ---------------------------------------------------------------------------------------


def test_ids_are_text_and_rows_without_an_id_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,x\n133,1\n0133,2\nNA,3\n,oops\n  ,4\n7,5\n")
    with caplog.at_level(logging.INFO, logger="vfl.data.tables"):
        table = load_table(TableSpec(path=path))
    assert table.ids.tolist() == ["133", "0133", "NA", "", "  ", "7"]  # positions kept
    assert table.dropped_ids == 2 and len(table) == 6 and table.id_rows().tolist() == [0, 1, 2, 5]
    assert np.isnan(table.features[3:5, 0]).all()  # "oops" is never checked: no id
    assert "2 rows have no id" in caplog.text and "oops" not in caplog.text
    parquet = write(tmp_path, pd.DataFrame({"id": [133, 7], "x": [1.0, 2.0]}), "t.parquet")
    assert load_table(TableSpec(path=parquet)).ids.tolist() == ["133", "7"]


def test_ids_written_as_decimals_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,x\n,0\n133.0,1\n7.0,2\n")
    with pytest.raises(DataError) as info:
        load_table(TableSpec(path=path))
    assert str(info.value) == (
        f"{path} line 3, column 'id': ids look like decimal numbers (133.0 where the other "
        "party has 133): they will not match; write the ids as integers"
    )  # no id of the file in an error or a log line; the report has it
    assert "'133.0'" in check_table(TableSpec(path=path)).render()
    assert peer_reason(info.value) == "the id column holds decimal numbers"
    path.write_text("id,x\n133.0,1\nabc,2\n")  # not every id: ids that merely contain ".0"
    assert load_table(TableSpec(path=path)).ids.tolist() == ["133.0", "abc"]


# -- numbers, labels, columns -------------------------------------------------------------


def test_errors_name_file_line_and_column_and_what_to_do(tmp_path: Path) -> None:
    frame = shop().astype({"spend": object})
    frame.loc[2, "spend"] = "secret"
    frame.loc[5, "spend"] = "also secret"
    path = write(tmp_path, frame)
    with pytest.raises(DataError) as info:
        load_table(spec(path))
    message = str(info.value)
    assert message.startswith(f"{path} line 4, column 'spend': not a number (2 rows, the first ")
    assert 'categorical = ["spend"]' in message and 'exclude_columns = ["spend"]' in message
    assert "secret" not in message
    parquet = write(tmp_path, frame.astype({"spend": str}), "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet row 3, column 'spend': not a number"):
        load_table(spec(parquet))
    with pytest.raises(DataError, match=r"the shop row 2, column 'spend': not a number"):
        frame_table(frame, spec=spec(Path("the shop")))


def test_extreme_magnitudes_are_refused_with_the_largest(tmp_path: Path) -> None:
    frame = shop()
    frame.loc[3, "spend"] = 4e150
    frame.loc[6, "spend"] = -7e200
    path = write(tmp_path, frame)
    with pytest.raises(DataError) as info:
        load_table(spec(path))
    assert str(info.value).startswith(
        f"{path} line 8, column 'spend': 2 values beyond 1e+100 in magnitude"
    )
    assert "logarithm" in str(info.value) and "e+200" not in str(info.value)  # no value logged
    assert "the largest is 7e+200" in check_table(spec(path)).render()  # the operator's view
    frame.loc[[3, 6], "spend"] = [MAX_ABS, -MAX_ABS]  # the bound itself is fine
    table = load_table(spec(write(tmp_path, frame, "ok.csv")))
    assert np.isfinite(Preprocessor.fit(table, np.arange(8)).transform(table)).all()


def test_labels_classes_and_the_binary_check(tmp_path: Path) -> None:
    frame = shop().assign(y=["no", "yes", "no", "yes", "no", "yes", "yes", "no"])
    path = write(tmp_path, frame)
    table = load_table(spec(path, classes=("no", "yes")))
    assert table.labels is not None and table.labels.tolist() == [0, 1, 0, 1, 0, 1, 1, 0]
    frame.loc[4, "y"] = "maybe"
    with pytest.raises(DataError, match=r"line 6, column 'y': a label that is not one of the "):
        load_table(spec(write(tmp_path, frame, "b.csv"), classes=("no", "yes")))
    numbers = shop()
    numbers.loc[1, "y"] = 2
    with pytest.raises(DataError) as info:
        load_table(spec(write(tmp_path, numbers, "n.csv"), binary_labels=True))
    assert "line 3, column 'y': labels must be 0 or 1 (a binary task); map other values with " in (
        str(info.value)
    ) and '[job] classes = ["<neg>", "<pos>"]' in str(info.value)
    assert load_table(spec(write(tmp_path, numbers, "n.csv"))).labels is not None  # multiclass


def test_a_column_named_like_the_label_is_refused_at_a_party_without_labels(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, shop().drop(columns=["city", "opened"]))
    with pytest.raises(DataError) as info:
        load_table(TableSpec(path=path, label_like="y"))
    assert str(info.value) == (
        f"{path} column 'y': column 'y' has the name of the job's label column; a party "
        "without labels must not use it as a feature: exclude it, or list it in "
        "feature_columns if it is not the label"
    )
    assert str(path) not in peer_reason(info.value) and "label column" in peer_reason(info.value)
    listed = FeatureSpec(feature_columns=("spend", "y"))
    assert load_table(TableSpec(path=path, label_like="y", features=listed)).columns == (
        "spend",
        "y",
    )
    excluded = FeatureSpec(exclude_columns=("y",))
    assert load_table(TableSpec(path=path, label_like="y", features=excluded)).columns == ("spend",)


def test_missing_feature_columns_are_listed_but_not_to_the_peer(tmp_path: Path) -> None:
    path = write(tmp_path, shop())
    wanted = FeatureSpec(feature_columns=("spend", "age", "income"))
    with pytest.raises(DataError) as info:
        load_table(TableSpec(path=path, features=wanted))
    assert "feature columns ['age', 'income'] are not in the file (names are" in str(info.value)
    public = peer_reason(info.value)
    assert "age" not in public and "spend" not in public and str(tmp_path) not in public
    undeclared = FeatureSpec(feature_columns=("spend",), date_columns=("opened",))
    with pytest.raises(DataError, match="column 'opened': declared a date column but not a feat"):
        load_table(TableSpec(path=path, features=undeclared))


def test_load_counts_the_other_problems(tmp_path: Path) -> None:
    frame = shop().astype({"spend": object})
    frame.loc[2, "spend"] = "x"
    frame.loc[3, "opened"] = "someday"
    frame.loc[1, "y"] = np.nan
    with pytest.raises(DataError, match=r"\(2 more problems: run `vfl data check`\)$"):
        load_table(spec(write(tmp_path, frame)))


# -- the report ------------------------------------------------------------------------------


def test_check_table_reports_every_problem(tmp_path: Path) -> None:
    frame = shop().assign(flag=[0, 1] * 4, same=5.0)
    frame = frame.astype({"spend": object})
    frame.loc[2, "spend"] = "x"
    frame.loc[4, "opened"] = None
    frame.loc[6, "id"] = "c1 "  # repeats line 3 once stripped
    frame.loc[7, "id"] = None
    path = write(tmp_path, frame)
    report = check_table(spec(path), warn_binary=True)
    assert isinstance(report, DataReport) and not report.ok
    assert (report.rows, report.usable_rows, report.dropped_ids) == (8, 7, 1)
    assert report.columns == ("spend", "city", "opened", "flag", "same")
    assert [(f.severity, f.line, f.column) for f in report.findings] == [
        (Severity.ERROR, 8, "id"),  # the duplicate, naming line 3 too
        (Severity.ERROR, 4, "spend"),
        (Severity.ERROR, 6, "opened"),
        (Severity.WARNING, None, "flag"),
        (Severity.WARNING, None, "same"),
    ]
    lines = report.render().splitlines()
    assert lines[0].startswith(f"{path}: 8 rows, 7 usable (1 without an id), 5 feature columns")
    assert f"{path}:8: column 'id': the same id as line 3; every id must be unique" in (
        "\n".join(lines)
    )
    assert f"{path}:6: column 'opened': missing date" in report.render()
    assert f"{path}: column 'same': warning: constant column" in report.render()
    assert f"{path}: column 'flag': warning: binary column: if it is derived from the label" in (
        report.render()
    )
    assert json.loads(json.dumps(report.to_json()))["ok"] is False
    first = check_table(spec(path), duplicates=DuplicatePolicy.FIRST)
    repeated = [f for f in first.findings if f.column == "id"]
    assert [f.severity for f in repeated] == [Severity.WARNING]
    assert not check_table(spec(path), warn_binary=False).warnings[0].message.startswith("binary")
    gone = check_table(spec(tmp_path / "none.csv"))
    assert not gone.ok and gone.render().endswith("none.csv: the data file does not exist")


# -- categories and dates --------------------------------------------------------------------


def test_categories_and_dates_are_encoded_from_training_rows_only(tmp_path: Path) -> None:
    features = FeatureSpec(
        categorical=(("city", Encoding.ONEHOT),),
        date_columns=("opened",),
        max_categories=3,
    )
    path = write(tmp_path, shop())
    table = load_table(TableSpec(path=path, label_column="y", features=features))
    train = np.arange(6)  # Brest (row 6) and the missing city (row 7) are not training rows
    pre = Preprocessor.fit(table, train)
    assert pre.input_columns == ("spend", "city", "opened")
    assert pre.output_columns == (
        "spend",
        "city=Paris",
        "city=Lyon",
        "city=<other>",
        "opened:age_days",
        "opened:dow",
        "opened:month",
    )
    x = pre.transform(table)
    raw = x * np.array(pre.scale) + np.array(pre.mean)  # undo the scaling
    paris, lyon, other = [1, 0, 0], [0, 1, 0], [0, 0, 1]
    assert np.allclose(raw[:, 1:4], [paris, lyon, paris, other, paris, lyon, other, other])
    assert pre.references == (pd.Timestamp("2024-02-29").value / 86400e9,)  # latest in training
    assert np.allclose(raw[:, 4], [59, 29, 66, 0, 28, 45, -10, 9])
    assert np.allclose(raw[:, 5], [0, 2, 0, 3, 3, 0, 6, 1])  # Monday 2024-01-01 is 0
    assert np.allclose(raw[:, 6], [1, 1, 12, 2, 2, 1, 3, 2])
    assert np.allclose(x[train].mean(axis=0), 0, atol=1e-12)
    ordinal = FeatureSpec(categorical=(("city", Encoding.ORDINAL),), date_columns=("opened",))
    other = load_table(TableSpec(path=path, label_column="y", features=ordinal))
    o = Preprocessor.fit(other, train)
    codes = o.transform(other)[:, 1] * o.scale[1] + o.mean[1]
    assert np.allclose(codes, [2, 0, 2, 1, 2, 0, -1, -1])  # Lyon, Nice, Paris; unseen -1
    share = FeatureSpec(categorical=(("city", Encoding.FREQUENCY),), date_columns=("opened",))
    third = load_table(TableSpec(path=path, label_column="y", features=share))
    f = Preprocessor.fit(third, train)
    shares = f.transform(third)[:, 1] * f.scale[1] + f.mean[1]
    assert np.allclose(shares, [3 / 6, 2 / 6, 3 / 6, 1 / 6, 3 / 6, 2 / 6, 0, 0])


def test_a_saved_preprocessor_loads_and_scores_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, shop())
    table = load_table(spec(path))
    pre = Preprocessor.fit(table, np.arange(6))
    again = Preprocessor.from_json(json.loads(json.dumps(pre.to_json())))
    assert again == pre and again.output_columns == pre.output_columns
    scoring = load_table(TableSpec(path=path, features=pre.spec))  # no label: ignored
    assert again.transform(scoring).tobytes() == pre.transform(table).tobytes()
    old = {"columns": ["a", "b"], "fill": [0.0, 1.0], "mean": [1.0, 2.0], "scale": [1.0, 3.0]}
    legacy = Preprocessor.from_json(old)
    assert legacy.input_columns == legacy.output_columns == ("a", "b")
    numeric = PartyTable(
        source=Path("t"), ids=np.array(["1", "2"]), columns=("a", "b"), features=np.ones((2, 2))
    )
    assert legacy.transform(numeric).tolist() == [[0.0, -1 / 3], [0.0, -1 / 3]]
    with pytest.raises(DataError, match="inconsistent"):
        Preprocessor.from_json(old | {"fill": [0.0]})


def test_dates_missing_or_unreadable(tmp_path: Path) -> None:
    frame = shop()
    frame.loc[2, "opened"] = None
    frame.loc[5, "opened"] = "soon"
    path = write(tmp_path, frame)
    report = check_table(spec(path))
    assert [(f.line, f.message.split(";")[0]) for f in report.errors] == [
        (7, "not a date"),
        (4, "missing date"),
    ]
    imputed = FeatureSpec(
        categorical=(("city", Encoding.ONEHOT),),
        date_columns=("opened",),
        impute=ImputePolicy.MEAN,
    )
    mean = spec(path, features=imputed)
    table = load_table(mean)
    assert np.isnan(table.days[[2, 5], 0]).all()  # type: ignore[index]
    assert [f.severity for f in check_table(mean).findings] == [Severity.WARNING]
    x = Preprocessor.fit(table, np.arange(8)).transform(table)
    assert np.isfinite(x).all()


# -- no shared customers -------------------------------------------------------------------


def test_no_shared_customers_in_a_simulation() -> None:
    def table(side: str, prefix: str) -> PartyTable:
        frame = pd.DataFrame({"id": [f"{prefix}{i}" for i in range(5)], "x": range(5)})
        return party_table(frame, side=side, id_column="id", label=None)

    with pytest.raises(AlignmentError, match=r"^no shared customers: the two parties' ids have"):
        align(
            table("guest", "a"),
            table("host", "b"),
            id_type=IdType.GENERIC,
            executor=InlineExecutor(),
            id_column="id",
        )


PARTY = """
[party]
id = "{me}"
role = "{role}"
listen = "127.0.0.1:0"
state_dir = "state-{me}"

[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"

[[peers]]
id = "{peer}"
role = "{peer_role}"
address = "127.0.0.1:1"

[[peers]]
id = "arbiter"
role = "arbiter"
address = "127.0.0.1:2"

[data]
customers = "{me}.csv"
"""


def test_no_shared_customers_in_the_services_psi(tmp_path: Path) -> None:
    configs = {}
    for me, role, peer, peer_role in (
        ("bank", "guest", "retailer", "host"),
        ("retailer", "host", "bank", "guest"),
    ):
        text = PARTY.format(me=me, role=role, peer=peer, peer_role=peer_role)
        configs[me] = parse_config(tomllib.loads(text), source=tmp_path / f"{me}.toml")
        ids = [f"{me}-{i}" for i in range(6)]
        pd.DataFrame({"id": ids, "x": range(6)}).to_csv(tmp_path / f"{me}.csv", index=False)
    guest, host = channel_pair(BANK, RETAILER)
    answered = threading.Event()

    def on_hello(envelope: Any) -> None:
        try:
            answer_psi(config=configs["retailer"], channel=host, envelope=envelope, executor=INLINE)
        finally:
            answered.set()

    host.add_handler(MessageFilter.for_tags(PsiTag.HELLO), on_hello)
    request = PsiRequest(peer="retailer", data="customers", job_id="empty")
    with pytest.raises(AlignmentError, match=r"^no shared customers: .*data 'customers'"):
        run_psi(config=configs["bank"], channel=guest, executor=INLINE, request=request)
    assert answered.wait(20)


INLINE = InlineExecutor()
