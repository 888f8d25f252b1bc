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


# -- code the docs name ------------------------------------------------------------------------

PACKAGES = ("protocols", "psi", "vfl")
FILE_REF = re.compile(r"(?<![\w/.-])((?:protocols|psi|vfl|benchmarks|tests)/[\w/]*\.py)\b")
DOTTED_REF = re.compile(r"(?<![\w/.])((?:protocols|psi|vfl)(?:\.\w+)+)")


def defined_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (classes, functions, assignments)."""
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def names_code(dotted: str, root: Path = ROOT) -> bool:
    """Whether ``dotted`` reads as a module path: its second part is a module or package of
    the tree (``psi.protocol``), not a config key, tag or file name (``psi.min_pad_to``,
    ``psi.HELLO``, ``psi.json``) nor a name of a package's ``__init__`` (``vfl.Client``)."""
    first, second = dotted.split(".")[:2]
    base = root / first / second
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir()


def dotted_resolves(dotted: str, root: Path = ROOT) -> bool:
    """``a.b.c.Name.attr``: the longest prefix that is a module or package of the tree, then
    (if anything is left) a name that module defines."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
        if module is None and (base / "__init__.py").is_file():
            module = base / "__init__.py"
        if module is None:
            continue
        rest = parts[cut:]
        return not rest or rest[0] in defined_names(module)
    return False


def stale_references(paths: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for ref in sorted(set(FILE_REF.findall(text))):
            if not (root / ref).exists() and not (root / ref.rstrip(".")).exists():
                found.append(f"{path.relative_to(root)}: {ref}")
        for ref in sorted(set(DOTTED_REF.findall(text))):
            if names_code(ref, root) and not dotted_resolves(ref, root):
                found.append(f"{path.relative_to(root)}: {ref}")
    return found


def test_docs_and_docstrings_name_code_that_exists() -> None:
    """Every module path (``vfl/service/runner.py``) and dotted name
    (``vfl.client.Client``) in the docs and in the code's own docstrings and comments exists,
    so a move cannot leave a stale reference behind."""
    code = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    found = stale_references(markdown_files() + code)
    assert not found, "references to code that does not exist:\n" + "\n".join(found)


def test_the_reference_check_catches_a_stale_name(tmp_path: Path) -> None:
    (tmp_path / "vfl" / "splitnn").mkdir(parents=True)
    (tmp_path / "vfl" / "__init__.py").write_text("")
    (tmp_path / "vfl" / "splitnn" / "guest.py").write_text("class GuestSession: ...\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "`vfl.splitnn.guest.GuestSession` and `vfl/splitnn/guest.py` are fine;\n"
        "`vfl.splitnn.session.GuestSession`, `vfl.splitnn.guest.Gone` and "
        "`vfl/splitnn/local.py` are not.\n"
    )
    assert stale_references([doc], tmp_path) == [
        "doc.md: vfl/splitnn/local.py",
        "doc.md: vfl.splitnn.guest.Gone",
        "doc.md: vfl.splitnn.session.GuestSession",
    ]
