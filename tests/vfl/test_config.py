"""Party config: a valid file loads; every bad one names the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.errors import ConfigError, InsecureConfigError
from protocols.roles import Role
from vfl.config import load_config
from vfl.splitnn.jobfile import load_job_file

GOOD = """
[party]
id = "bank"
role = "guest"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "certs/ca.pem"
certificate = "certs/bank.pem"
key = "certs/bank.key"

[[peers]]
id = "retailer"
role = "host"
address = "10.0.0.2:50051"
certificate = "certs/retailer.pem"

[data]
credit = "data/credit.csv"

[transport]
retry_seconds = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "party.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.party.party_id == "bank" and cfg.party.role is Role.GUEST
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.tls.key == tmp_path / "certs" / "bank.key"
    assert cfg.peer("retailer").certificate == tmp_path / "certs" / "retailer.pem"
    assert cfg.data["credit"] == tmp_path / "data" / "credit.csv"
    assert cfg.transport.retry_seconds == 5


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ('id = "bank"', 'idd = "bank"', "[party]: unknown key 'idd'"),
        ('role = "guest"', 'role = "banker"', "party.role: 'banker' is not a role"),
        ('id = "bank"', 'id = "Bank_1"', "party.id: 'Bank_1' is not a valid party id"),
        (
            'listen = "127.0.0.1:0"',
            'listen = "localhost"',
            "party.listen: 'localhost' is not host:port",
        ),
        (
            'address = "10.0.0.2:50051"',
            "address = 5",
            "peers[0].address: must be a non-empty string",
        ),
        ('id = "retailer"', 'id = "bank"', "peers[0].id: 'bank' is this party itself"),
        ("retry_seconds = 5", "retry_seconds = -1", "transport retry_seconds must be positive"),
        ("retry_seconds = 5", "retries = 5", "[transport]: unknown key 'retries'"),
        ("retry_seconds = 5", 'retry_seconds = "5"', "transport.retry_seconds must be a number"),
        ('ca = "certs/ca.pem"', "", "tls.ca: missing"),
        ("[tls]", "[tlss]", "unknown key 'tlss'"),
        ('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0', "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, old: str, new: str, needle: str) -> None:
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_unknown_peer_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(peers: retailer\)"):
        load_config(write(tmp_path, GOOD)).peer("arbiter")


def test_example_configs_load() -> None:
    folder = Path(__file__).resolve().parents[2] / "examples" / "three_parties"
    tomls = sorted(folder.glob("*.toml"))
    configs = [load_config(p) for p in tomls if not p.name.endswith("_job.toml")]
    assert {c.party.party_id for c in configs} == {"arbiter", "bank", "retailer"}
    for c in configs:
        assert all(path.is_file() for path in c.data.values()), c.data
    jobs = [load_job_file(p) for p in tomls if p.name.endswith("_job.toml")]
    aliases = {c.party.party_id: set(c.data) for c in configs}
    assert jobs and all(
        j.guest_data in aliases["bank"] and j.host_data in aliases["retailer"] for j in jobs
    )


def test_job_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nguest_data = "credit"\nhost_data = "credit"\nbatchsize = 3\n')
    with pytest.raises(
        ConfigError, match=r"job.toml: \[job\] has unknown key\(s\) \['batchsize'\]"
    ):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "credit"\nhost_data = "credit"\n[model]\neta_w = 2.0\n')
    with pytest.raises(ConfigError, match="job.toml: eta_w = 2.0"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "c"\nplaintext = true\n')
    with pytest.raises(InsecureConfigError, match="--plaintext"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "c"\n[protect]\nmode = "none"\n')
    with pytest.raises(InsecureConfigError, match="allow_label_leak"):
        load_job_file(job)
    job.write_text('[job]\nguest_data = "c"\nhost_data = "h"\nepochs = 3\n[model]\nd = 4\n')
    parsed = load_job_file(job)
    assert parsed.job.epochs == 3 and parsed.job.train.d == 4 and parsed.host_data == "h"
    assert parsed.job.train.protect.mode.value == "marvell"  # a protecting default
