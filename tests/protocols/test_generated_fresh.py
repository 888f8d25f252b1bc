"""The committed protobuf code is exactly what the pinned grpcio-tools generates."""

from __future__ import annotations

from pathlib import Path

from protocols.generated.regenerate import PROTO_FILES, regenerate

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    regenerate(tmp_path, ROOT / "proto")
    for name in PROTO_FILES:
        stem = name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi"):
            fresh = (tmp_path / f"{stem}{suffix}").read_text()
            committed = (ROOT / "protocols" / "generated" / f"{stem}{suffix}").read_text()
            assert fresh == committed, f"{stem}{suffix} is stale: run `make proto` and commit"
