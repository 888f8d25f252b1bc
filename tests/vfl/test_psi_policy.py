"""The host's ``[psi]`` policy: a guest's PSI request only chooses among what the host allows,
and a refusal tells the guest the rule, never the host's paths, columns, rows or counts
(docs/protocol.md §3.4.1). In-process: the host service's HELLO handler on an in-memory
network, the guest's real ``run_guest``."""

from __future__ import annotations

import json
import logging
import re
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocols.errors import (
    AlignmentError,
    ConfigError,
    DataError,
    JobRefusedError,
    PolicyViolationError,
    peer_reason,
)
from protocols.executor import InlineExecutor
from protocols.transport.base import MessageFilter
from psi.canon import DuplicatePolicy, IdType, prepare_ids
from psi.inprocess import channel_pair
from psi.protocol import PsiMode, PsiOptions, PsiResult, PsiTag, run_guest
from psi.result import read_result, write_result
from tests.conftest import BANK, RETAILER
from vfl.config import PartyConfig, PsiDataPolicy, parse_config
from vfl.service.accept import check_offer
from vfl.service.alignment import answer_psi
from vfl.service.drivers.splitnn import aligned_table
from vfl.splitnn.job import JobOffer, SplitJob
from vfl.splitnn.training import TrainConfig

HOST = """
[party]
id = "retailer"
role = "host"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"

[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"

[[peers]]
id = "arbiter"
role = "arbiter"
address = "127.0.0.1:2"

[data]
customers = "retailer_private_customers.csv"
dups = "retailer_private_dups.csv"
gone = "retailer_private_gone.csv"
"""

POLICY = """
[psi]
modes = ["both", "guest_only"]
min_pad_to = 64

[psi.data.customers]
id_column = "cust_id"
id_type = "generic"
"""

# what no refusal may carry: the host's folder and files, its columns
SECRETS = ("retailer_private", "cust_id", "age", "updated", "email")


def host_config(tmp_path: Path, policy: str = POLICY) -> PartyConfig:
    return parse_config(tomllib.loads(HOST + policy), source=tmp_path / "retailer.toml")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rows = 40
    frame = pd.DataFrame(
        {
            "cust_id": [f"c{i}" for i in range(rows)],
            "age": [20 + i % 50 for i in range(rows)],
            "email": [f"c{i}@shop.example" for i in range(rows)],
            "updated": ["2026-01-01"] * rows,
        }
    )
    frame.to_csv(tmp_path / "retailer_private_customers.csv", index=False)
    dups = frame.copy()
    dups.loc[7, "cust_id"] = "c3"  # rows 3 and 7 share an id
    dups.rename(columns={"cust_id": "id"}).to_csv(
        tmp_path / "retailer_private_dups.csv", index=False
    )
    return tmp_path


def psi(
    config: PartyConfig,
    request: dict[str, Any],
    *,
    mode: PsiMode = PsiMode.BOTH,
    pad_to: int | None = 64,
    id_type: IdType = IdType.GENERIC,
) -> PsiResult:
    """The guest's PSI against a host that answers with its service's handler."""
    guest, host = channel_pair(BANK, RETAILER)
    answered = threading.Event()

    def on_hello(envelope: Any) -> None:
        try:
            answer_psi(config=config, channel=host, envelope=envelope, executor=InlineExecutor())
        finally:
            answered.set()

    host.add_handler(MessageFilter.for_tags(PsiTag.HELLO), on_hello)
    try:
        return run_guest(
            channel=guest,
            host=RETAILER,
            job_id="pol",
            ids=prepare_ids([f"c{i}" for i in range(0, 60, 2)], id_type=id_type),
            executor=InlineExecutor(),
            options=PsiOptions(mode=mode, pad_to=pad_to, timeout=20),
            request=request,
        )
    finally:
        assert answered.wait(20)  # the host's handler is done (result written, log lines)


def refusal(config: PartyConfig, request: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(AlignmentError) as caught:
        psi(config, request, **kwargs)
    message = str(caught.value)
    for secret in (*SECRETS, str(config.source.parent)):
        assert secret not in message, message
    # no row numbers or counts: the only numbers are the limits the rule names
    assert set(re.findall(r"\d+", message)) <= {"64"}, message
    return message


REFUSED = "retailer (host) refused the PSI: "
RULE = REFUSED + "refused by the host's [psi] policy: "


@pytest.mark.parametrize(
    ("request_", "kwargs", "expected", "logged"),
    [
        (  # the attack: a PSI on the age column would reveal every distinct age
            {"data": "customers", "id_column": "age"},
            {},
            RULE + "id column not allowed for data alias 'customers' (psi id_column; omit it "
            "to use the host's)",
            "requested 'age', configured 'cust_id'",
        ),
        (
            {"data": "customers", "duplicates": "first"},
            {},
            RULE + "duplicates policy 'first' not allowed for data alias 'customers' (the "
            "host's is 'error')",
            "psi duplicates",
        ),
        (
            {"data": "customers", "timestamp_column": "updated"},
            {},
            RULE + "timestamp column not allowed for data alias 'customers' (psi timestamp_column)",
            "requested 'updated'",
        ),
        (
            {"data": "customers"},
            {"pad_to": 63},
            RULE + "padding below the minimum (psi.min_pad_to = 64)",
            "requested pad_to 63",
        ),
        (
            {"data": "customers"},
            {"pad_to": None},
            RULE + "padding below the minimum (psi.min_pad_to = 64)",
            "requested pad_to None",
        ),
        (
            {"data": "customers"},
            {"mode": PsiMode.CARDINALITY},
            RULE + "mode 'cardinality' not allowed (psi.modes: both, guest_only)",
            "requested cardinality",
        ),
        (
            {"data": "customers"},
            {"id_type": IdType.NATIONAL_ID},
            RULE + "id type 'national_id' not allowed for data alias 'customers' (psi id_type)",
            "configured generic",
        ),
    ],
)
def test_a_request_outside_the_hosts_policy_is_refused_by_rule(
    data: Path,
    caplog: pytest.LogCaptureFixture,
    request_: dict[str, Any],
    kwargs: dict[str, Any],
    expected: str,
    logged: str,
) -> None:
    """The guest learns the rule, nothing of the host's files; the host's log has the rest."""
    config = host_config(data)
    with caplog.at_level(logging.WARNING, logger="vfl.service.alignment"):
        assert refusal(config, request_, **kwargs) == expected
    log = "\n".join(r.getMessage() for r in caplog.records if r.name == "vfl.service.alignment")
    assert "refused PSI pol" in log and logged in log, log


@pytest.mark.parametrize(
    ("policy", "request_", "kwargs", "expected", "logged"),
    [
        (  # the host's own policy: duplicates are an error
            "",
            {"data": "dups"},
            {},
            REFUSED + "the data has duplicate ids (duplicates policy 'error')",
            "row 7 has the same canonical id as row 3",
        ),
        (  # 40 ids do not fit the guest's padding: one bit, never the count
            "",
            {"data": "customers", "id_column": "cust_id"},
            {"pad_to": 32},
            REFUSED + "the set is larger than the agreed padding pad_to = 32",
            "40 ids exceed",
        ),
        (
            "",
            {"data": "gone"},
            {},
            REFUSED + "the data file of the alias is missing",
            "retailer_private_gone.csv does not exist",
        ),
        (
            '[psi]\nid_column = "customer_number"\n',
            {"data": "customers"},
            {},
            REFUSED + "a configured column cannot be read from the data",
            "available columns: ['cust_id', 'age', 'email', 'updated']",
        ),
        (
            "",
            {"data": "secret"},
            {},
            REFUSED + "data alias 'secret' is not offered to guests (accept.data)",
            "accept.data",
        ),
    ],
)
def test_the_hosts_data_problems_reach_the_guest_as_rules_only(
    data: Path,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    request_: dict[str, Any],
    kwargs: dict[str, Any],
    expected: str,
    logged: str,
) -> None:
    config = host_config(data, policy)
    if "pad_to" in kwargs:
        config = host_config(data, '[psi.data.customers]\nid_column = "cust_id"\n')
    with caplog.at_level(logging.WARNING):
        message = str(pytest.raises(AlignmentError, psi, config, request_, **kwargs).value)
    assert message == expected
    for secret in SECRETS:
        assert secret not in message
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert logged in log, log


def test_the_host_uses_its_own_columns_and_binds_its_result(data: Path) -> None:
    """A request naming only the alias runs on the host's configured id column; naming the
    same column is fine; the host's result records what it aligned."""
    config = host_config(data)
    for request in ({"data": "customers"}, {"data": "customers", "id_column": "cust_id"}):
        out = psi(config, request)
        assert out.intersection_size == 20 and out.peer_list_size == 64
    summary, rows = read_result(config.state_dir, "pol")
    assert rows is not None and len(rows) == 20
    assert (summary["data"], summary["id_column"], summary["peer"]) == (
        "customers",
        "cust_id",
        "bank",
    )


def test_a_psi_job_id_of_another_guests_result_is_refused(data: Path) -> None:
    """A PSI job id whose result at the host is another guest's is refused with the rule only,
    and that result stays as it was (no guest overwrites another's PSI result); an unreadable
    result refuses everyone, since whose it is cannot be told."""
    config = host_config(data)
    psi(config, {"data": "customers"})  # the bank's own result; it may run it again
    folder = config.state_dir / "psi" / "pol"
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "peer": "bank2"}))
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    message = refusal(config, {"data": "customers"})
    assert "psi job id in use here" in message and "bank2" not in message
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    (folder / "summary.json").write_text("{not json")
    assert "psi job id in use here" in refusal(config, {"data": "customers"})


def test_jobs_on_a_psi_result_go_through_the_same_policy(data: Path) -> None:
    """Split-NN / transfer jobs at the host: its own id column, and only a PSI result it ran
    with that guest on that alias."""
    config = host_config(data)
    frame = pd.DataFrame({"cust_id": ["c0", "c1", "c2"], "age": [31, 47, 25]})
    frame.to_csv(data / "retailer_private_customers.csv", index=False)  # numbers only
    result = PsiResult(
        role="host",
        mode=PsiMode.BOTH,
        run_id="00",
        intersection_size=2,
        rows=np.array([1, 0]),
        own_list_size=64,
        peer_list_size=64,
        summary={"data": "customers", "id_column": "cust_id", "peer": "bank"},
    )
    write_result(config.state_dir, "p", result)
    request = {"data": "customers", "psi_job": "p"}
    table = aligned_table(config, request, labels=None, guest="bank")
    assert list(table.ids) == ["c1", "c0"] and "cust_id" not in table.columns
    with pytest.raises(JobRefusedError) as caught:
        aligned_table(config, {**request, "id_column": "age"}, labels=None, guest="bank")
    assert peer_reason(caught.value).startswith(
        "refused by the host's [psi] policy: id column not allowed"
    )
    with pytest.raises(JobRefusedError) as caught:
        aligned_table(config, request, labels=None, guest="mallory")
    assert peer_reason(caught.value) == "PSI p aligned other data or another guest here"
    # a split-NN JOB_START naming another id column is refused at J2, before anything loads
    offer = JobOffer(
        guest="bank",
        job=SplitJob(job_id="j", train=TrainConfig(d=3, k=2)),
        request={"data": "customers", "id_column": "age"},
    )
    with pytest.raises(JobRefusedError, match=re.escape("[psi] policy: id column not allowed")):
        check_offer(config, offer)


def test_psi_config(tmp_path: Path) -> None:
    default = host_config(tmp_path, "").psi
    assert default.modes == frozenset(PsiMode) and default.min_pad_to == 0
    assert default.for_alias("customers") == PsiDataPolicy()  # "id", duplicates "error"
    policy = host_config(
        tmp_path,
        '[psi]\nduplicates = "first"\n[psi.data.dups]\nduplicates = "latest"\n'
        'timestamp_column = "updated"\n',
    ).psi
    assert policy.for_alias("customers").duplicates is DuplicatePolicy.FIRST
    assert policy.for_alias("dups").timestamp_column == "updated"
    for bad, needle in (
        ('[psi]\nmodes = ["all"]', "psi.modes: 'all' is not one of"),
        ("[psi]\nmin_pad_to = -1", "psi.min_pad_to must be a whole number"),
        ('[psi.data.other]\nid_column = "x"', "psi.data.other: 'other' is not an alias"),
        ('[psi.data.dups]\nduplicates = "latest"', 'duplicates = "latest" needs a timestamp'),
        ('[psi]\ntimestamp_column = "t"', "unknown key 'timestamp_column'"),
        ('[psi.data.dups]\nid_kind = "x"', "unknown key 'id_kind'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            host_config(tmp_path, bad)


def test_peer_reason_keeps_details_at_home() -> None:
    detail = DataError("/srv/retailer/customers.csv row 12, column 'income': not a number")
    assert peer_reason(detail) == ("DataError: its data failed a check (details in its own log)")
    assert peer_reason(DataError("x", public="the data has duplicate ids")) == (
        "the data has duplicate ids"
    )
    assert peer_reason(PolicyViolationError("Z_FWD step 9 is outside the job's schedule")) == (
        "Z_FWD step 9 is outside the job's schedule"
    )
    assert peer_reason(RuntimeError("/srv/x")) == "an internal error (details in its own log)"
    assert peer_reason(TimeoutError("/srv/x")) == "TimeoutError: a timeout (details in its own log)"
