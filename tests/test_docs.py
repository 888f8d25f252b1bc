"""The repository stands on its own: a short README, relative links that resolve, and no
reference to a folder outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12_288
# [text](target) with an optional "title"; images too. Not inside inline code.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
OUTSIDE = "../" + "shared"  # spelt in two parts so this file does not match itself


def markdown_files() -> list[Path]:
    """The README, docs/ and the other READMEs that point into docs/."""
    others = [ROOT / "benchmarks" / "README.md", ROOT / "data" / "README.md"]
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *others,
        *sorted((ROOT / "examples").glob("*/README.md")),
    ]


def relative_links(path: Path) -> list[str]:
    text = CODE.sub("", path.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file but .venv/.git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        return [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv"}
        return [
            p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move details into docs/"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve() -> None:
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part) if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_link_check_sees_links() -> None:
    readme = relative_links(ROOT / "README.md")
    assert "docs/protocol.md" in readme and "data/README.md" in readme


def test_nothing_points_outside_the_repository() -> None:
    found = []
    for path in repository_files():
        if not path.is_file() or path.suffix in {".gz", ".png", ".npz", ".npy"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if OUTSIDE in text:
            found.append(str(path.relative_to(ROOT)))
    assert not found, f"files referring to {OUTSIDE}: {found}"
