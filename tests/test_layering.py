"""The import rules of docs/architecture.md, and the size of a module.

Imports only go down: protocols -> psi -> vfl. Inside ``protocols`` the crypto is
transport-free; inside ``vfl`` the base packages (common, data, models, privacy) import no
mode, the modes (splitnn, fedavg, transfer) import none of each other nor scoring, scoring only
split-NN of the modes, the config and the report import no mode, the estimate only split-NN,
and nothing of these imports a top module (the service, the CLI, the estimate, the public
API; the estimate excepted for itself). Every import counts: module-level and
function-level (lazy) ones, absolute and relative. No module is over ``MAX_CODE_LINES`` lines
of code unless its docstring says why.

Each rule is one test; each test first shows that its checker catches a bad example.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocols", "psi", "vfl")
UPWARD = {"protocols": {"psi", "vfl"}, "psi": {"vfl"}, "vfl": set()}

TRAINING_MODES = ("vfl.splitnn", "vfl.fedavg", "vfl.transfer")
MODES = (*TRAINING_MODES, "vfl.scoring")
BASE = ("vfl.common", "vfl.data", "vfl.models", "vfl.privacy")
PUBLIC_API = "vfl"  # the names vfl/__init__.py defines (``from vfl import train``)
TOP = (
    PUBLIC_API,
    "vfl.__main__",
    "vfl.cli",
    "vfl.client",
    "vfl.datasets",
    "vfl.estimate",
    "vfl.service",
    "vfl.simulate",
)
"""What runs jobs and faces users: it may import everything below, nothing below imports it."""

MAX_CODE_LINES = 600
KEPT_AS_ONE = "Kept as one module because"
KNOWN_OVERSIZE: frozenset[str] = frozenset()  # none: add a stated reason instead

Rule = Mapping[str, tuple[str, ...]]
"""Package or module (dotted) -> what it may not import (dotted prefixes)."""


def matches(target: str, prefix: str) -> bool:
    """Whether module ``target`` is ``prefix`` or inside it; a top-level package as a prefix
    (``vfl``) matches only itself, i.e. the names of its ``__init__``, not its subpackages."""
    return target == prefix or ("." in prefix and target.startswith(prefix + "."))


def module_name(path: Path, root: Path) -> str:
    """``vfl/splitnn/job.py`` -> ``vfl.splitnn.job``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str, root: Path) -> bool:
    """Whether ``dotted`` names a module or package of the tree at ``root``."""
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, anywhere in it (functions included), as dotted names.

    ``from a.b import c`` gives ``a.b.c`` when that is a module of the tree, else ``a.b`` (a
    name defined in ``a/b``); relative imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if is_module(candidate, root) else base)
    return found


def files_of(dotted: str, root: Path) -> Iterator[Path]:
    """The Python files of package or module ``dotted`` under ``root``."""
    path = root.joinpath(*dotted.split("."))
    if path.is_dir():
        yield from sorted(path.rglob("*.py"))
    elif path.with_suffix(".py").is_file():
        yield path.with_suffix(".py")


def violations(rule: Rule, root: Path = ROOT) -> list[str]:
    """``"<file> imports <module>"`` for every import ``rule`` forbids."""
    found = []
    for source, forbidden in rule.items():
        for path in files_of(source, root):
            for target in sorted(imported_modules(path, root)):
                if any(matches(target, prefix) for prefix in forbidden):
                    found.append(f"{path.relative_to(root).as_posix()} imports {target}")
    return found


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- protocols -> psi -> vfl -----------------------------------------------------------------


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for package, forbidden in UPWARD.items():
        for path in files_of(package, root):
            bad = {m.split(".")[0] for m in imported_modules(path, root)} & forbidden
            if bad:
                found.append(f"{path.relative_to(root).as_posix()} imports {sorted(bad)}")
    return found


def test_no_upward_imports(tmp_path: Path) -> None:
    write(tmp_path, "protocols/x.py", "import os\nfrom vfl.config import load_config\n")
    write(tmp_path, "psi/y.py", "def f() -> None:\n    import psi.canon\n    import vfl.data\n")
    assert upward_imports(tmp_path) == [
        "protocols/x.py imports ['vfl']",
        "psi/y.py imports ['vfl']",
    ]
    found = upward_imports()
    assert not found, "upward imports:\n" + "\n".join(found)


def test_models_import_only_torch(tmp_path: Path) -> None:
    """Plain torch models: besides the standard library they import torch and vfl.models."""

    def outside(root: Path) -> list[str]:
        found = []
        for path in files_of("vfl.models", root):
            for target in sorted(imported_modules(path, root)):
                root_name = target.split(".")[0]
                if root_name in sys.stdlib_module_names or root_name == "torch":
                    continue
                if not matches(target, "vfl.models"):
                    found.append(f"{path.relative_to(root).as_posix()} imports {target}")
        return found

    write(tmp_path, "vfl/models/m.py", "import torch.nn\nfrom . import n\nimport numpy\n")
    write(tmp_path, "vfl/models/n.py", "def f() -> None:\n    from ..data import tables\n")
    write(tmp_path, "vfl/data/tables.py", "")
    assert outside(tmp_path) == [
        "vfl/models/m.py imports numpy",
        "vfl/models/n.py imports vfl.data.tables",
    ]
    found = outside(ROOT)
    assert not found, "\n".join(found)


# -- inside protocols --------------------------------------------------------------------------

CRYPTO_IS_TRANSPORT_FREE: Rule = {
    "protocols.crypto": ("protocols.transport", "protocols.link", "protocols.arbiter"),
}


def test_crypto_imports_no_transport(tmp_path: Path) -> None:
    write(tmp_path, "protocols/crypto/c.py", "def f() -> None:\n    from ..link import JobLink\n")
    write(tmp_path, "protocols/link.py", "")
    write(tmp_path, "protocols/crypto/d.py", "from protocols.transport.base import Channel\n")
    assert violations(CRYPTO_IS_TRANSPORT_FREE, tmp_path) == [
        "protocols/crypto/c.py imports protocols.link",
        "protocols/crypto/d.py imports protocols.transport.base",
    ]
    found = violations(CRYPTO_IS_TRANSPORT_FREE)
    assert not found, "\n".join(found)


# -- inside vfl --------------------------------------------------------------------------------

MODES_APART: Rule = {
    mode: tuple(other for other in MODES if other != mode) for mode in TRAINING_MODES
}
BASE_BELOW_MODES: Rule = {
    package: (*MODES, "vfl.service", "vfl.estimate", "vfl.config") for package in BASE
}
SCORING_ON_SPLITNN: Rule = {"vfl.scoring": ("vfl.fedavg", "vfl.transfer", "vfl.service")}
NOTHING_BELOW_IMPORTS_TOP: Rule = {package: TOP for package in (*MODES, *BASE)}
SERVICE_LIBRARIES: Rule = {
    "vfl.config": (*MODES, *TOP),
    "vfl.report": (*MODES, *TOP),
    "vfl.estimate": (
        *(mode for mode in MODES if mode != "vfl.splitnn"),
        *(top for top in TOP if top != "vfl.estimate"),
    ),
}


def test_modes_import_none_of_each_other(tmp_path: Path) -> None:
    write(tmp_path, "vfl/fedavg/client.py", "def f() -> None:\n    from vfl.splitnn import job\n")
    write(tmp_path, "vfl/splitnn/job.py", "")
    write(tmp_path, "vfl/transfer/host.py", "from ..fedavg.client import f\n")
    write(tmp_path, "vfl/splitnn/guest.py", "from vfl.scoring.protocol import ScoreTag\n")
    assert violations(MODES_APART, tmp_path) == [
        "vfl/splitnn/guest.py imports vfl.scoring.protocol",
        "vfl/fedavg/client.py imports vfl.splitnn.job",
        "vfl/transfer/host.py imports vfl.fedavg.client",
    ]
    found = violations(MODES_APART)
    assert not found, "\n".join(found)


def test_base_packages_import_no_mode_service_estimate_or_config(tmp_path: Path) -> None:
    write(tmp_path, "vfl/data/tables.py", "def f() -> None:\n    import vfl.scoring.grants\n")
    write(tmp_path, "vfl/privacy/dp.py", "from vfl.config import PartyConfig\n")
    write(
        tmp_path,
        "vfl/common/ok.py",
        "from vfl.models.mlp import Mlp\nfrom vfl.data import tables\n",
    )
    assert violations(BASE_BELOW_MODES, tmp_path) == [
        "vfl/data/tables.py imports vfl.scoring.grants",
        "vfl/privacy/dp.py imports vfl.config",
    ]
    found = violations(BASE_BELOW_MODES)
    assert not found, "\n".join(found)


def test_scoring_imports_only_splitnn_of_the_modes(tmp_path: Path) -> None:
    write(tmp_path, "vfl/scoring/protocol.py", "from vfl.splitnn.saved import SavedModel\n")
    write(tmp_path, "vfl/scoring/grants.py", "def f() -> None:\n    from vfl.service import jobs\n")
    write(tmp_path, "vfl/scoring/batch.py", "from vfl.transfer.ftl import FtlModel\n")
    assert violations(SCORING_ON_SPLITNN, tmp_path) == [
        "vfl/scoring/batch.py imports vfl.transfer.ftl",
        "vfl/scoring/grants.py imports vfl.service",
    ]
    found = violations(SCORING_ON_SPLITNN)
    assert not found, "\n".join(found)


def test_modes_and_base_import_no_top_module(tmp_path: Path) -> None:
    write(tmp_path, "vfl/__init__.py", "def train() -> None: ...\n")
    write(tmp_path, "vfl/cli.py", "")
    write(tmp_path, "vfl/splitnn/guest.py", "from vfl import train\nfrom vfl import splitnn\n")
    write(tmp_path, "vfl/fedavg/train.py", "def f() -> None:\n    from vfl.estimate.job import x\n")
    write(tmp_path, "vfl/data/ids.py", "def f() -> None:\n    from .. import cli\n")
    write(tmp_path, "vfl/models/mlp.py", "import vfl\n")
    assert violations(NOTHING_BELOW_IMPORTS_TOP, tmp_path) == [
        "vfl/splitnn/guest.py imports vfl",
        "vfl/fedavg/train.py imports vfl.estimate.job",
        "vfl/data/ids.py imports vfl.cli",
        "vfl/models/mlp.py imports vfl",
    ]
    found = violations(NOTHING_BELOW_IMPORTS_TOP)
    assert not found, "\n".join(found)


# -- sizes -------------------------------------------------------------------------------------


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
                and first.end_lineno is not None
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def oversize(root: Path = ROOT, *, known: frozenset[str] = frozenset()) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in files_of(package, root):
            relative = path.relative_to(root).as_posix()
            if "generated" in path.parts or relative in known:
                continue
            lines = code_lines(path)
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            if lines > MAX_CODE_LINES and KEPT_AS_ONE not in docstring:
                found.append(f"{relative}: {lines} lines of code")
    return found


def test_no_module_over_600_lines_of_code(tmp_path: Path) -> None:
    body = "".join(f"x{i} = {i}\n" for i in range(MAX_CODE_LINES + 1))
    padding = "# a comment\n\n" * 400
    write(tmp_path, "vfl/big.py", '"""Too big."""\n' + body)
    write(tmp_path, "vfl/kept.py", f'"""Kept.\n\n{KEPT_AS_ONE} it reads as one."""\n' + body)
    write(tmp_path, "psi/talky.py", '"""Mostly words.\n' + "words\n" * 700 + '"""\n' + padding)
    write(tmp_path, "protocols/known.py", body)
    assert code_lines(tmp_path / "psi" / "talky.py") == 0
    assert oversize(tmp_path, known=frozenset({"protocols/known.py"})) == [
        f"vfl/big.py: {MAX_CODE_LINES + 1} lines of code"
    ]
    found = oversize(known=frozenset(KNOWN_OVERSIZE))
    assert not found, f"over {MAX_CODE_LINES} lines of code:\n" + "\n".join(found)


def test_config_report_and_estimate_stay_below_the_service(tmp_path: Path) -> None:
    """The party config and the report import no mode; the estimate only split-NN (it
    estimates split-NN jobs); none of them a top module but itself."""
    write(tmp_path, "vfl/config/party.py", "from vfl.privacy.label_protection import ProtectMode\n")
    write(tmp_path, "vfl/config/scoring.py", "def f() -> None:\n    import vfl.scoring.grants\n")
    write(tmp_path, "vfl/report.py", "from vfl.service import jobs\n")
    write(
        tmp_path,
        "vfl/estimate/job.py",
        "from vfl.splitnn.job import SplitJob\nfrom . import measure\n",
    )
    write(
        tmp_path, "vfl/estimate/measure.py", "def f() -> None:\n    from vfl.fedavg import train\n"
    )
    assert violations(SERVICE_LIBRARIES, tmp_path) == [
        "vfl/config/scoring.py imports vfl.scoring.grants",
        "vfl/report.py imports vfl.service",
        "vfl/estimate/measure.py imports vfl.fedavg",
    ]
    found = violations(SERVICE_LIBRARIES)
    assert not found, "\n".join(found)


SIMULATION_NEVER_IMPORTS: Rule = {
    api: ("vfl.service", "vfl.client", "vfl.cli") for api in ("vfl.simulate", "vfl.datasets")
}


def test_the_simulation_api_runs_without_the_service(tmp_path: Path) -> None:
    """The in-process API (vfl.simulate, vfl.datasets) is above the modes, beside the service:
    it never imports the service, the services' client or the CLI."""
    write(tmp_path, "vfl/simulate/vertical.py", "from vfl.service.runner import JobRunner\n")
    write(tmp_path, "vfl/datasets.py", "def f() -> None:\n    from vfl import cli\n")
    write(tmp_path, "vfl/cli.py", "")
    assert violations(SIMULATION_NEVER_IMPORTS, tmp_path) == [
        "vfl/simulate/vertical.py imports vfl.service.runner",
        "vfl/datasets.py imports vfl.cli",
    ]
    found = violations(SIMULATION_NEVER_IMPORTS)
    assert not found, "\n".join(found)
