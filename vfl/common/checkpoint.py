"""Per-step checkpoints of one party's part of a split-NN job (docs/protocol.md §4.4.1).

Roles: every data party keeps its own checkpoints in its own state folder; nothing here
is ever sent to or read from another party. A checkpoint holds the party's step, its share
of ``W_h`` and the peer's share as ciphertexts, its plaintext parameters, optimizer state,
random generator states and its bookkeeping (epoch history, evaluation counter).

Format (no pickle anywhere): ``<folder>/step-<t>/`` with

* ``tensors.safetensors``: every torch tensor (model and optimizer state, torch RNG state);
* ``state.json``: big-integer arrays as hex strings with their shapes, and the JSON-able
  rest (optimizer hyperparameters, numpy generator states, history). Non-tensor leaves of a
  state dict are stored in place; tensors are replaced by ``{"__tensor__": key}``.

A checkpoint is written to a temporary folder, each file fsynced, then renamed into place,
so a kill at any moment leaves either the old set or the new one. Files are 0600 and
folders 0700 from the moment they exist (the folder is the caller's, built with
:func:`protocols.ids.state_path` from the job id). :func:`prune` keeps the
steps the protocol still needs (two at the guest, one or two at the host).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from protocols.errors import DataError
from protocols.files import PRIVATE_DIR, atomic_write, private_dir

_PREFIX = "step-"
BEST = "best"


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint."""

    step: int
    tensors: dict[str, torch.Tensor]
    big_ints: dict[str, np.ndarray]
    meta: dict[str, Any]

    def tree(self, name: str) -> Any:
        """Rebuild the state dict stored under ``name`` by :func:`flatten`."""
        return _unflatten(self.meta["trees"][name], self.tensors)


def flatten(name: str, tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a (nested) state dict; its tensors go into ``tensors``."""
    if isinstance(tree, torch.Tensor):
        key = name
        tensors[key] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(tree, Mapping):
        return {"__items__": [[k, flatten(f"{name}.{k}", v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, list | tuple):
        return {"__list__": [flatten(f"{name}.{i}", v, tensors) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"cannot checkpoint a {type(tree).__name__} at {name}")


def _unflatten(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__items__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__items__"]}
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
    return node


def step_dir(folder: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives."""
    return folder / f"{_PREFIX}{step:09d}"


def available_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        if child.name.startswith(_PREFIX) and (child / "state.json").is_file():
            try:
                out.append(int(child.name[len(_PREFIX) :]))
            except ValueError:
                continue
    return sorted(out)


def save(
    folder: Path,
    step: int,
    *,
    trees: Mapping[str, Any],
    big_ints: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Write checkpoint ``step`` atomically (owner-only permissions) and return its folder."""
    tensors: dict[str, torch.Tensor] = {}
    flat = {name: flatten(name, tree, tensors) for name, tree in trees.items()}
    state = {
        "step": step,
        "trees": flat,
        "big_ints": encode_big_ints(big_ints),
        **dict(meta),
    }
    final = step_dir(folder, step)
    tmp = write_folder(folder, f".tmp-{final.name}", tensors=tensors, state=state)
    replace_folder(tmp, final)
    return final


def encode_big_ints(big_ints: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Big-integer arrays as JSON: shape and hex digits (what :func:`read_folder` decodes)."""
    return {
        name: {"shape": list(a.shape), "hex": [format(int(v), "x") for v in a.reshape(-1)]}
        for name, a in big_ints.items()
    }


def write_folder(
    parent: Path, name: str, *, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> Path:
    """``tensors.safetensors`` and ``state.json`` in a new owner-only folder under ``parent``
    (a temporary name: :func:`replace_folder` moves it into place)."""
    private_dir(parent)
    tmp = parent / f"{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=PRIVATE_DIR)
    os.chmod(tmp, PRIVATE_DIR)
    try:  # written owner-only and fsynced (never created with the umask's mode first)
        atomic_write(tmp / "tensors.safetensors", safetensors_bytes(dict(tensors)))
        atomic_write(tmp / "state.json", json.dumps(state).encode())
    except BaseException:  # a full disk: leave no half-written folder taking up space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a folder written by :func:`write_folder` into place (replacing an old one)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def read_folder(where: Path) -> Checkpoint:
    """Read what :func:`write_folder` wrote (``OSError``/``ValueError`` if broken)."""
    state = json.loads((where / "state.json").read_text())
    tensors = load_file(str(where / "tensors.safetensors"))
    big = {
        name: np.array([int(h, 16) for h in v["hex"]], dtype=object).reshape(tuple(v["shape"]))
        for name, v in state.pop("big_ints").items()
    }
    return Checkpoint(step=int(state.get("step", 0)), tensors=tensors, big_ints=big, meta=state)


def load(folder: Path, step: int | str) -> Checkpoint:
    """Read checkpoint ``step`` (or the ``best`` snapshot), naming what is wrong if it is broken."""
    where = folder / BEST if step == BEST else step_dir(folder, int(step))
    try:
        return read_folder(where)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"checkpoint {where} is unreadable ({exc}); delete it to resume from the one before"
        ) from None


def prune(folder: Path, keep: Iterable[int]) -> None:
    """Delete every step checkpoint not in ``keep``."""
    wanted = set(keep)
    for step in available_steps(folder):
        if step not in wanted:
            shutil.rmtree(step_dir(folder, step), ignore_errors=True)


def snapshot_best(folder: Path, step: int) -> None:
    """Copy checkpoint ``step`` to ``best`` atomically (early stopping restores it)."""
    tmp = folder / f".tmp-best-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(step_dir(folder, step), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder / f".old-best-{os.getpid()}"
    if (folder / BEST).exists():
        os.rename(folder / BEST, old)
    os.rename(tmp, folder / BEST)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
