"""Pure pieces of FedAvg: client sampling, parameter vectors, combined metrics, and the
column statistics of step F4 (no channels, no keys)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from protocols.errors import DataError

MIN_SCALE = 1e-12


def sample_participants(
    clients: Sequence[str], *, per_round: int, job_id: str, round_no: int
) -> tuple[str, ...]:
    """The clients of round ``round_no`` (F5): all of them, or ``per_round`` drawn without
    replacement by a generator seeded from the job and round, so a resumed run draws the same."""
    ordered = sorted(clients)
    if per_round <= 0 or per_round >= len(ordered):
        return tuple(ordered)
    seed = hashlib.sha256(f"fedavg-sample|{job_id}|{round_no}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "big"))
    chosen = rng.choice(len(ordered), size=per_round, replace=False)
    return tuple(ordered[i] for i in sorted(chosen))


def parameter_vector(model: nn.Module) -> np.ndarray:
    """Every parameter of ``model`` flattened in ``state_dict`` order, as float64."""
    parts = [v.detach().reshape(-1).to(torch.float64).numpy() for v in model.state_dict().values()]
    return np.concatenate(parts) if parts else np.zeros(0)


def load_parameter_vector(model: nn.Module, vector: np.ndarray) -> None:
    """Write a vector made by :func:`parameter_vector` back into ``model``."""
    state = model.state_dict()
    total = sum(v.numel() for v in state.values())
    if vector.shape != (total,):
        raise DataError(f"parameter vector has {vector.shape} values, the model needs {total}")
    offset = 0
    new = {}
    for name, value in state.items():
        size = value.numel()
        chunk = vector[offset : offset + size].reshape(value.shape)
        new[name] = torch.from_numpy(np.ascontiguousarray(chunk)).to(value.dtype)
        offset += size
    model.load_state_dict(new)


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters (F2: the clients' initial models must agree)."""
    return hashlib.sha256(parameter_vector(model).astype("<f8").tobytes()).hexdigest()


def combine_metrics(reports: Mapping[str, Mapping[str, float]], *, weight: str) -> dict[str, float]:
    """Weighted mean of every metric the reports share, weighted by their ``weight`` entry
    (the clients' validation rows); the result's ``weight`` is the total. AUC and KS are
    not additive, so their combination is the row-weighted mean of the clients' values."""
    if not reports:
        return {}
    names = set.intersection(*(set(r) for r in reports.values())) - {weight}
    total = float(sum(r[weight] for r in reports.values()))
    out = {weight: total}
    if total <= 0:
        return out
    for name in sorted(names):
        out[name] = float(sum(r[name] * r[weight] for r in reports.values()) / total)
    return out


@dataclass(frozen=True)
class Standardizer:
    """Global column means and deviations (F4); missing values become the mean."""

    mean: np.ndarray
    scale: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardised float32 features; NaN (missing) becomes 0, the global mean."""
        z = np.asarray((x - self.mean) / self.scale, dtype=np.float64)
        return np.nan_to_num(z, nan=0.0).astype(np.float32)


def first_moments(x: np.ndarray) -> np.ndarray:
    """F4 step 0, per column: fraction of present values, mean and mean absolute value
    (missing values count as 0), over this client's training rows."""
    present = np.isfinite(x)
    filled = np.where(present, x, 0.0)
    return np.concatenate([present.mean(axis=0), filled.mean(axis=0), np.abs(filled).mean(axis=0)])


def centre(first: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global ``(fraction present, mean, scale a)`` from the averaged step-0 statistics; ``a``
    (the mean absolute value) keeps step 1's sums of squares inside the overflow guard."""
    frac, mean_sum, abs_sum = (first[i * columns : (i + 1) * columns] for i in range(3))
    if np.any(frac <= 0):
        col = int(np.argmax(frac <= 0))
        raise DataError(f"feature column {col} has no value at any client")
    mean = mean_sum / frac
    a = np.maximum(abs_sum / frac, MIN_SCALE)
    return frac, mean, a


def second_moments(x: np.ndarray, mean: np.ndarray, a: np.ndarray) -> np.ndarray:
    """F4 step 1, per column: mean of ``((x − μ)/a)²`` over present values (missing: 0)."""
    present = np.isfinite(x)
    dev = np.where(present, (x - mean) / a, 0.0)
    return np.asarray((dev**2).mean(axis=0))


def finish(second: np.ndarray, frac: np.ndarray, mean: np.ndarray, a: np.ndarray) -> Standardizer:
    """The standardiser from both steps' averages (population deviation of present values)."""
    std = a * np.sqrt(np.maximum(second / frac, 0.0))
    return Standardizer(mean=mean, scale=np.where(std > MIN_SCALE, std, 1.0))
