"""Saved models: each party's own part of a trained split NN, for scoring (docs/protocol.md §5).

Roles: the guest saves its bottom model, ``W_g, b`` and top model; the host saves its
bottom model, its share ``E`` and G's share as ciphertexts ``[[W^G]]`` (under the arbiter's
key, which neither data party can decrypt). Neither file set holds anything of the other
party in plaintext, and nothing is ever sent: each party keeps its folder in its own state
directory, ``<state_dir>/models/<model_id>/`` (0700, every file 0600; the path is built with
:func:`protocols.ids.state_path`, so a model id is always an identifier, docs/protocol.md §2.9):

* ``tensors.safetensors``: the party's torch weights (no pickle);
* ``state.json``: big-integer arrays (host: ``e``, ``enc_wg``) as hex, owner-only;
* ``manifest.json``: model id, job id, role, parties, columns, preprocessing, the training
  configuration, the interactive layer's layout (mode, slots, d, k), fixed-point scales, the
  key id, the test metrics (guest) and the sha256 of the two other files.

The folder is written under a temporary name and renamed into place, so a kill leaves the
old model or the new one. :func:`load_model` checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.errors import ConfigError, DataError
from protocols.files import atomic_write
from protocols.ids import state_path
from vfl.common import checkpoint as ckpt
from vfl.data.preprocess import Preprocessor
from vfl.models.split import Task
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.training import GuestModels, TrainConfig, guest_models, host_bottom

MODEL_FORMAT = 1
_FILES = ("tensors.safetensors", "state.json")


def model_dir(state_dir: Path, model_id: str) -> Path:
    """Where this party keeps ``model_id`` (:class:`~protocols.ids.UnsafePathError` unless it
    is an identifier and the folder stays under ``state_dir``)."""
    return state_path(state_dir, "models", model_id)


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    """A training configuration as plain JSON (the manifest's ``train``)."""
    out: dict[str, Any] = {}
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name == "protect":
            value = {
                p.name: (
                    getattr(value, p.name).value if p.name == "mode" else getattr(value, p.name)
                )
                for p in fields(ProtectConfig)
            }
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Enum):
            value = value.value
        out[f.name] = value
    return out


def config_from_json(obj: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_json` (a field a manifest lacks takes its default, so a
    model saved before the loss options were added still loads)."""
    raw = dict(obj)
    protect = dict(raw.pop("protect"))
    protect["mode"] = ProtectMode(protect["mode"])
    for key in ("guest_widths", "host_widths", "top_widths"):
        raw[key] = tuple(int(w) for w in raw[key])
    raw["task"] = Task(raw["task"])
    return TrainConfig(**raw, protect=ProtectConfig(**protect))


@dataclass(frozen=True)
class SavedModel:
    """One party's saved part of a model."""

    folder: Path
    manifest: dict[str, Any]
    weights: dict[str, torch.Tensor]
    big_ints: dict[str, np.ndarray]

    @property
    def model_id(self) -> str:
        """The model's id (the training job's id unless renamed)."""
        return str(self.manifest["model_id"])

    @property
    def config(self) -> TrainConfig:
        """The training configuration (the host's holds only its own fields)."""
        return config_from_json(self.manifest["train"])

    @property
    def preprocessor(self) -> Preprocessor:
        """The imputation and scaling fitted on the training rows."""
        return Preprocessor.from_json(self.manifest["preprocessing"])

    @property
    def fixed_point(self) -> FixedPointConfig:
        """The fixed-point scales the model was trained with."""
        return FixedPointConfig(**self.manifest["fixed_point"])

    @property
    def key_id(self) -> bytes:
        """The id of the arbiter's key that ``[[W^G]]`` is encrypted under."""
        return bytes.fromhex(self.manifest["key_id"])

    def guest_module(self) -> GuestModels:
        """The guest's bottom, ``W_g, b`` and top model with the saved weights."""
        if self.manifest["role"] != "guest":
            raise ConfigError(f"model {self.model_id} here is the host's part")
        built = guest_models(len(self.preprocessor.output_columns), self.config)
        built.load_state_dict(self.weights)
        built.eval()
        return built

    def host_module(self) -> nn.Module:
        """The host's bottom model with the saved weights."""
        if self.manifest["role"] != "host":
            raise ConfigError(f"model {self.model_id} here is the guest's part")
        built = host_bottom(len(self.preprocessor.output_columns), self.config)
        built.load_state_dict(self.weights)
        built.eval()
        return built


def save_model(
    *,
    state_dir: Path,
    model_id: str,
    manifest: dict[str, Any],
    module: nn.Module,
    big_ints: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write this party's part of ``model_id`` atomically (owner-only) and return its folder."""
    final = model_dir(state_dir, model_id)
    tmp = ckpt.write_folder(
        final.parent,
        f".tmp-model-{model_id}",
        tensors=dict(module.state_dict()),
        state={"big_ints": ckpt.encode_big_ints(big_ints or {})},
    )
    body = {
        "format": MODEL_FORMAT,
        "model_id": model_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **manifest,
        "files": {name: _sha256(tmp / name) for name in _FILES},
    }
    try:
        atomic_write(tmp / "manifest.json", json.dumps(body, indent=2).encode(), mode=0o600)
    except BaseException:  # a full disk: no half-written model folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt.replace_folder(tmp, final)
    return final


def load_model(state_dir: Path, model_id: str) -> SavedModel:
    """Read and check this party's part of ``model_id``."""
    folder = model_dir(state_dir, model_id)
    path = folder / "manifest.json"
    if not path.is_file():
        known = sorted(p.name for p in folder.parent.glob("*") if not p.name.startswith("."))
        raise ConfigError(
            f"no model {model_id!r} in {folder.parent} (models here: {', '.join(known) or 'none'})"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MODEL_FORMAT}")
        for name in _FILES:
            if _sha256(folder / name) != manifest["files"][name]:
                raise ValueError(f"{name} does not match its sha256 in the manifest")
        loaded = ckpt.read_folder(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"model {folder} is broken: {exc}; export it again") from None
    return SavedModel(
        folder=folder, manifest=manifest, weights=loaded.tensors, big_ints=loaded.big_ints
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
