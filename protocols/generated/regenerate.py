"""Regenerate the protobuf modules from ``proto/``: ``python -m protocols.generated.regenerate``.

The output is committed; ``tests/protocols/test_generated_fresh.py`` regenerates it into a
temporary folder and fails if it differs from what is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ("transport.proto",)


def regenerate(out_dir: Path, proto_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on :data:`PROTO_FILES` into ``out_dir``."""
    from grpc_tools import protoc  # dev dependency, pinned exactly in pyproject.toml

    for name in PROTO_FILES:
        args = [
            "protoc",
            f"-I{proto_dir}",
            f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
            f"--python_out={out_dir}",
            f"--mypy_out={out_dir}",
            str(proto_dir / name),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto_dir / name}")


def main() -> None:
    """Regenerate into this package."""
    root = Path(__file__).resolve().parents[2]
    regenerate(Path(__file__).parent, root / "proto")
    sys.stdout.write("regenerated protocols/generated\n")


if __name__ == "__main__":
    main()
