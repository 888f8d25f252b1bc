"""Label leakage over a whole training run, per protection mode (issue 16, docs/protocol.md §4.7).

What an auditor reruns. Each case trains a split-NN job through the real sessions (guest, host
and arbiter in this process, ``run_in_process``) in plaintext-cipher mode: the integers, and so
the host's view, are bit for bit those of an encrypted job (benchmarks/quality.py: encrypted and
fixed-point test scores identical). The host's view is recorded at the host, after each step:
the rows of ``BATCH``, the α it encoded and the ``g_h`` it decoded from B1
(``HostTrainer.observer``). Every attack of :mod:`vfl.privacy.attacks` then runs on that view at
the end of every epoch (12 epochs, no early stop; the test AUC is the model of the best
validation epoch, as a job keeps it):

* ``step_norm``, ``step_direction``, ``update_tracking``: on the steps of that epoch;
* ``avg_norm``, ``avg_pc1``, ``avg_direction``: each row's ``g_h`` averaged over all its visits
  so far (the multi-visit attack);
* ``diff_norm``, ``diff_pc1``, ``diff_completion``: each row's last live ``g_h`` minus its first
  (cancels noise fixed per row; added after the committed results were measured, see
  docs/protocol.md §4.7.1);
* ``clustering``: 2-means / first principal component of the host's own α;
* ``completion_{grad,alpha}_{20,1pct}``: logistic regression on averaged ``g_h`` or α fitted on
  20 known labels (10 per class) or 1 % of the rows.

Data sets: ``synthetic`` (10 % positives; the host's 8 features are independent of the label, so
every leak is the protocol's: leak AUCs are absolute), ``default_credit`` (the split and model of
``benchmarks/quality.py``; the host's own features predict the label somewhat, so each attack is
reported next to its **baseline**, the same attack with the same known rows on the host's raw
features, and the excess counts), and ``credit_imbalanced`` (default_credit with the positives
of the training and validation rows subsampled to 5 %, for the utility of the default on rare
positives).

Every mode here uses the stratified split of benchmarks/quality.py (a job under ``rr_labels``
splits without stratification, docs/protocol.md §4.7.2); ``validation_auc`` is what the guest saw,
i.e. against the randomized labels under ``rr_labels``; leak and test AUCs use the true labels.

Writes ``benchmarks/results/leakage.json`` and ``benchmarks/results/leakage.png`` (leak AUC:
worst attack, worst seed, every epoch, against test AUC, per mode and strength).

Run: ``python -m benchmarks.leakage`` (about an hour on 2 cores); ``--quick`` for 2 seeds and
4 epochs; ``--modes marvell,none`` to pick cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import quality  # benchmarks/quality.py: the same data, split and model

from protocols.executor import InlineExecutor
from protocols.files import atomic_write
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import PartyTable, Splits, split_rows
from vfl.privacy.attacks import (
    HostView,
    ViewRecorder,
    averaging_attack,
    clustering_attack,
    completion_attack,
    differencing_attack,
    direction_attack,
    known_rows,
    latest_embeddings,
    norm_attack,
    track_updates,
    update_tracking_attack,
    visit_means,
)
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.inprocess import run_in_process
from vfl.splitnn.job import SplitJob
from vfl.splitnn.training import TrainConfig

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
EPOCHS = 12
OFF = ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)
DEFAULT = ProtectConfig()

MODES: dict[str, ProtectConfig] = {
    "none": OFF,
    "marvell_s4_fresh": ProtectConfig(power_scale=4.0, persistence=0.0, max_visits=0),
    "marvell_s2": ProtectConfig(power_scale=2.0, max_visits=0),
    "marvell_s4": ProtectConfig(power_scale=4.0, max_visits=0),
    "marvell_s8": ProtectConfig(power_scale=8.0, max_visits=0),
    "marvell_s16": ProtectConfig(power_scale=16.0, max_visits=0),
    "marvell_s8_cap3": ProtectConfig(power_scale=8.0, max_visits=3),
    "marvell_s16_cap3": ProtectConfig(power_scale=16.0, max_visits=3),  # the default
    "max_norm": ProtectConfig(mode=ProtectMode.MAX_NORM, max_visits=0),
    "rr_eps1": ProtectConfig(mode=ProtectMode.RR_LABELS, epsilon=1.0, max_visits=0),
    "rr_eps2": ProtectConfig(mode=ProtectMode.RR_LABELS, epsilon=2.0, max_visits=0),
    "rr_eps4": ProtectConfig(mode=ProtectMode.RR_LABELS, epsilon=4.0, max_visits=0),
}


def default_name() -> str:
    """The MODES entry that is the shipped default (``ProtectConfig()``)."""
    return next(name for name, config in MODES.items() if config == DEFAULT)


@dataclass(frozen=True)
class Task:
    """One data set: both parties' tables in one row order, splits, model and batch."""

    name: str
    guest: PartyTable
    host: PartyTable
    splits: Splits
    config: TrainConfig
    batch: int


CREDIT_MODEL = replace(quality.CONFIG, protect=DEFAULT)


def _table(source: str, ids: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> PartyTable:
    columns = tuple(f"x{i}" for i in range(x.shape[1]))
    return PartyTable(source=Path(source), ids=ids, columns=columns, features=x, labels=y)


def synthetic() -> Task:
    """10 % positives; the guest's 6 features carry the label, the host's 8 do not."""
    rng = np.random.default_rng(16)
    n = 8000
    y = (rng.permutation(n) < n // 10).astype(np.float64)
    u = rng.normal(0, 1, 6)
    xg = rng.normal(0, 1, (n, 6)) + 1.2 * y[:, None] * u / np.linalg.norm(u)
    xh = rng.normal(0, 1, (n, 8))
    ids = np.array([f"c{i}" for i in range(n)], dtype=object)
    config = TrainConfig(d=8, k=8, guest_widths=(16, 8), host_widths=(16, 8), learning_rate=0.01)
    return Task(
        name="synthetic",
        guest=_table("synthetic_guest", ids, xg, y),
        host=_table("synthetic_host", ids, xh, None),
        splits=split_rows(y, test_fraction=0.2, validation_fraction=0.1, seed=0),
        config=config,
        batch=128,
    )


def default_credit(*, positive_rate: float | None = None) -> Task:
    """default_credit_hetero as in benchmarks/quality.py (optionally positives subsampled)."""
    guest, host, splits = quality.load_data()
    assert guest.labels is not None
    name = "default_credit"
    if positive_rate is not None:
        rng = np.random.default_rng(5)
        positives = np.flatnonzero(guest.labels == 1)
        negatives = np.flatnonzero(guest.labels == 0)
        keep = round(positive_rate / (1 - positive_rate) * negatives.size)
        rows = np.sort(np.concatenate([negatives, rng.choice(positives, keep, replace=False)]))
        guest, host, name = guest.take(rows), host.take(rows), "credit_imbalanced"
        assert guest.labels is not None
        splits = split_rows(guest.labels, test_fraction=0.2, validation_fraction=0.1, seed=0)
    return Task(name=name, guest=guest, host=host, splits=splits, config=CREDIT_MODEL, batch=256)


def load_task(name: str) -> Task:
    """A data set by name."""
    if name == "synthetic":
        return synthetic()
    if name == "default_credit":
        return default_credit()
    return default_credit(positive_rate=0.05)


def train(
    task: Task, protect: ProtectConfig, seed: int, epochs: int
) -> tuple[HostView, dict[str, Any]]:
    """One job through the sessions; the host's recorded view and the guest's result."""
    import torch

    torch.set_num_threads(1)
    config = replace(task.config, protect=protect, seed=seed)
    job = SplitJob(
        job_id=f"leak-{task.name}-{seed}",
        train=config,
        batch=task.batch,
        batch_eval=1024,
        epochs=epochs,
        patience=epochs,  # every epoch is attacked; the best validation epoch is kept
        encrypted=False,
    )
    recorder = ViewRecorder()
    run = run_in_process(  # the plaintext cipher never encrypts with the arbiter's key
        job=job,
        guest_table=task.guest,
        host_table=task.host,
        splits=task.splits,
        executor=InlineExecutor(),
        w0_seed=1000 + seed,
        order_seed=seed.to_bytes(32, "big"),
        host_seed=2000 + seed,
        host_observer=recorder,
    )
    return recorder.view(), {
        "test_auc": run.result.test["roc_auc"],
        "best_epoch": run.result.best_epoch,
        "validation_auc": [m.get("roc_auc") for m in run.result.history],
        "privacy": run.result.privacy,
    }


def _known(rows: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    return {
        "20": known_rows(rows, y, count=20, seed=seed, balanced=True),
        "1pct": known_rows(rows, y, count=max(4, rows.size // 100), seed=seed, balanced=False),
    }


def attack_epoch(
    view: HostView,
    y: np.ndarray,
    *,
    spe: int,
    epoch: int,
    known: dict[str, np.ndarray],
    tracked: dict[int, np.ndarray],
    k: int,
) -> dict[str, float]:
    """Every attack's leak AUC on the view at the end of ``epoch``."""
    start, stop = epoch * spe, (epoch + 1) * spe
    window = view.window(start, stop)
    out = {"step_norm": norm_attack(window, y), "step_direction": direction_attack(window, y)}
    tracking = update_tracking_attack(
        view, y, k, recovered=tracked, steps=range(start, stop)
    )  # None past the visit cap: nothing to recover
    if tracking is not None:
        out["update_tracking"] = tracking
    out.update(averaging_attack(view, y, known=known["20"], stop=stop))
    out.update(differencing_attack(view, y, known=known["20"], stop=stop))
    out["clustering"] = clustering_attack(view, y, stop=stop)
    grad_rows, grad_means = visit_means(view, stop=stop)
    alpha_rows, alpha = latest_embeddings(view, stop=stop)
    for name, rows_known in known.items():
        out[f"completion_grad_{name}"] = completion_attack(
            grad_rows, grad_means, y, known=rows_known
        )
        out[f"completion_alpha_{name}"] = completion_attack(alpha_rows, alpha, y, known=rows_known)
    return out


def baselines(
    task: Task, view: HostView, y: np.ndarray, known: dict[str, np.ndarray]
) -> dict[str, float]:
    """Each attack on the host's raw (preprocessed) features instead of the protocol's view."""
    x = Preprocessor.fit(task.host, task.splits.train).transform(task.host)
    raw = HostView(
        gradients=[x[r] for r in view.rows], embeddings=[x[r] for r in view.rows], rows=view.rows
    )
    out = {"step_norm": norm_attack(raw, y), "step_direction": direction_attack(raw, y)}
    out["update_tracking"] = max(out["step_norm"], out["step_direction"])
    out.update(averaging_attack(raw, y, known=known["20"]))
    out["clustering"] = clustering_attack(raw, y)
    for name in ("diff_norm", "diff_pc1", "diff_completion"):
        out[name] = 0.5  # H's raw features do not change between visits
    rows = np.unique(np.concatenate(view.rows))
    for name, rows_known in known.items():
        raw_completion = completion_attack(rows, x[rows], y, known=rows_known)
        for source in ("grad", "alpha"):  # both read the same raw features here
            out[f"completion_{source}_{name}"] = raw_completion
    return out


def case(args: tuple[str, str, int, int]) -> dict[str, Any]:
    """One (data set, mode, seed): train, then every attack at every epoch."""
    task_name, mode, seed, epochs = args
    task = load_task(task_name)
    started = time.monotonic()
    view, result = train(task, MODES[mode], seed, epochs)
    assert task.guest.labels is not None
    y = task.guest.labels  # the true labels: what the auditor measures against
    spe = len(task.splits.train) // task.batch
    rows = np.unique(np.concatenate(view.rows))
    known = _known(rows, y, seed)
    tracked = track_updates(view, task.config.k)
    per_epoch = [
        attack_epoch(view, y, spe=spe, epoch=e, known=known, tracked=tracked, k=task.config.k)
        for e in range(epochs)
    ]
    out = {
        "task": task_name,
        "mode": mode,
        "seed": seed,
        **result,
        "attacks": per_epoch,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if task_name != "synthetic":
        out["baselines"] = baselines(task, view, y, known)
    return out


def worst(cases: list[dict[str, Any]], *, excess: bool) -> tuple[float, str]:
    """Max over seeds, epochs and attacks of the leak AUC (or its excess over the baseline)."""
    best, which = -1.0, ""
    for c in cases:
        for epoch, attacks in enumerate(c["attacks"]):
            for name, value in attacks.items():
                v = value - c["baselines"][name] if excess else value
                if v > best:
                    best, which = v, f"{name} (seed {c['seed']}, epoch {epoch + 1})"
    return best, which


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and mode: worst attack (and excess), test AUC by seed, ε."""
    out: dict[str, Any] = {}
    for task in sorted({c["task"] for c in cases}):
        out[task] = {}
        for mode in MODES:
            mine = [c for c in cases if c["task"] == task and c["mode"] == mode]
            if not mine:
                continue
            entry: dict[str, Any] = {
                "seeds": [c["seed"] for c in mine],
                "test_auc": [round(c["test_auc"], 4) for c in mine],
                "test_auc_median": float(np.median([c["test_auc"] for c in mine])),
                "epsilon": mine[0]["privacy"].get("label_dp_epsilon"),
            }
            entry["worst_attack_auc"], entry["worst_attack"] = worst(mine, excess=False)
            per_attack: dict[str, float] = {}
            for c in mine:
                for attacks in c["attacks"]:
                    for name, value in attacks.items():
                        per_attack[name] = max(per_attack.get(name, 0.0), value)
            entry["per_attack_worst"] = {k: round(v, 4) for k, v in sorted(per_attack.items())}
            entry["per_epoch_worst_over_seeds"] = {
                name: [
                    round(max(c["attacks"][e].get(name, 0.0) for c in mine), 4)
                    for e in range(len(mine[0]["attacks"]))
                ]
                for name in sorted(per_attack)
            }
            if task != "synthetic":
                entry["worst_excess_auc"], entry["worst_excess"] = worst(mine, excess=True)
                entry["per_attack_worst_excess"] = {
                    name: round(
                        max(
                            max(a.get(name, 0.5) for a in c["attacks"]) - c["baselines"][name]
                            for c in mine
                        ),
                        4,
                    )
                    for name in sorted(per_attack)
                }
                entry["baselines"] = {k: round(v, 4) for k, v in mine[0]["baselines"].items()}
            out[task][mode] = entry
    return out


def figure(summary: dict[str, Any], path: Path) -> None:
    """Leak (worst attack, worst seed, every epoch) against default_credit's test AUC, per mode.

    Left: the synthetic task's absolute leak AUC; right: default_credit's excess over the
    baseline. Both against the utility that matters, default_credit's median test AUC; the
    dashed lines are the targets (leak 0.60 / excess 0.05, and ``none`` − 0.015).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    credit = summary.get("default_credit", {})
    panels = [
        ("synthetic", "worst_attack_auc", "worst leak AUC, synthetic (host features label-free)"),
        ("default_credit", "worst_excess_auc", "worst leak AUC minus baseline, default_credit"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (task, key, ylabel) in zip(axes, panels, strict=True):
        for mode, entry in summary.get(task, {}).items():
            if mode not in credit:
                continue
            x, y = credit[mode]["test_auc_median"], entry[key]
            star = mode == default_name()
            ax.scatter(x, y, marker="*" if star else "o", s=140 if star else 40)
            ax.annotate(mode, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(0.60 if task == "synthetic" else 0.05, color="grey", ls="--", lw=0.8)
        if "none" in credit:
            ax.axvline(credit["none"]["test_auc_median"] - 0.015, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("test AUC on default_credit (median over seeds)")
        ax.set_ylabel(ylabel)
    fig.suptitle("Label leakage over a whole run (12 epochs) against utility; * = the default")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CANDIDATES = ("none", "marvell_s4", "marvell_s8", "marvell_s8_cap3", "marvell_s16_cap3")


def measure(
    args: argparse.Namespace, modes: list[str], seeds: int, epochs: int
) -> list[dict[str, Any]]:
    """Every (task, mode, seed) case, two at a time."""
    jobs = []
    for task in args.tasks.split(","):
        for mode in modes:
            if task == "credit_imbalanced" and mode not in CANDIDATES:
                continue
            count = seeds if mode in CANDIDATES or args.quick else args.other_seeds
            if task == "credit_imbalanced" and not args.quick:
                count = args.other_seeds
            jobs += [(task, mode, seed, epochs) for seed in range(count)]
    cases = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for c in pool.map(case, jobs):
            cases.append(c)
            worst_auc = max(max(a.values()) for a in c["attacks"])
            print(
                f"{c['task']:18s} {c['mode']:18s} seed {c['seed']}  test AUC "
                f"{c['test_auc']:.4f}  worst attack {worst_auc:.3f}  ({c['wall_s']} s)",
                flush=True,
            )
    return cases


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 epochs")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the default's candidates")
    parser.add_argument("--other-seeds", type=int, default=3, help="seeds of the other modes")
    parser.add_argument(
        "--summarise", type=Path, help="recompute the summary from this file's cases (no runs)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated MODES keys")
    parser.add_argument("--tasks", default="synthetic,default_credit,credit_imbalanced")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "leakage.json")
    args = parser.parse_args()
    seeds = 2 if args.quick else args.seeds
    epochs = 4 if args.quick else EPOCHS
    modes = [m for m in args.modes.split(",") if m]
    started = time.monotonic()
    if args.summarise:
        previous = json.loads(args.summarise.read_text())
        cases, seeds, epochs = previous["cases"], previous["seeds"], previous["epochs"]
        measured = previous.get("cases_measured", {})
    else:
        cases = measure(args, modes, seeds, epochs)
        measured = {"git_commit": git_commit(), "measured_at": now()}
    summary = summarise(cases)
    name = default_name()
    synth = summary.get("synthetic", {})
    credit = summary.get("default_credit", {})
    out: dict[str, Any] = {
        "git_commit": git_commit(),
        "measured_at": now(),
        "cases_measured": measured,
        "epochs": epochs,
        "seeds": seeds,
        "default_mode": name,
        "default_config": {k: str(v) for k, v in DEFAULT.__dict__.items()},
        "default_worst_attack_auc": synth.get(name, {}).get("worst_attack_auc"),
        "default_worst_attack": synth.get(name, {}).get("worst_attack"),
        "default_worst_excess_auc": credit.get(name, {}).get("worst_excess_auc"),
        "default_worst_excess": credit.get(name, {}).get("worst_excess"),
    }
    same_seed = [
        (c["test_auc"], d["test_auc"])
        for c in cases
        if c["task"] == "default_credit" and c["mode"] == name and c["seed"] == 0
        for d in cases
        if d["task"] == "default_credit" and d["mode"] == "none" and d["seed"] == 0
    ]
    if same_seed:
        out["default_test_auc"], out["none_test_auc"] = same_seed[0]
    imbalanced = summary.get("credit_imbalanced", {})
    if name in imbalanced and "none" in imbalanced:
        out["imbalanced_default_test_auc_median"] = imbalanced[name]["test_auc_median"]
        out["imbalanced_none_test_auc_median"] = imbalanced["none"]["test_auc_median"]
    formal = [m for m, c in MODES.items() if c.mode is ProtectMode.RR_LABELS and c.epsilon <= 2]
    if formal and "none" in credit:
        best = max(
            (m for m in formal if m in credit),
            key=lambda m: credit[m]["test_auc_median"],
            default=None,
        )
        if best is not None:
            out["best_formal_eps_le_2"] = {
                "mode": best,
                "epsilon": credit[best]["epsilon"],
                "test_auc_median": credit[best]["test_auc_median"],
                "none_test_auc_median": credit["none"]["test_auc_median"],
                "cost": credit["none"]["test_auc_median"] - credit[best]["test_auc_median"],
            }
    out["targets"] = {
        "default_worst_attack_auc": 0.60,
        "default_worst_excess_auc": 0.05,
        "default_test_auc_below_none": 0.015,
    }
    out["summary"] = summary
    out["cases"] = [
        {**c, "attacks": [{k: round(v, 4) for k, v in a.items()} for a in c["attacks"]]}
        for c in cases
    ]
    out["wall_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2, default=str) + "\n").encode())
    figure(summary, args.out.with_suffix(".png"))
    for key in (
        "default_mode",
        "default_worst_attack_auc",
        "default_worst_attack",
        "default_worst_excess_auc",
        "default_worst_excess",
        "default_test_auc",
        "none_test_auc",
    ):
        print(f"{key:28s} {out.get(key)}")
    for task, entries in summary.items():
        for mode, e in entries.items():
            print(
                f"{task:18s} {mode:18s} test {e['test_auc_median']:.4f} worst "
                f"{e['worst_attack_auc']:.3f} excess {e.get('worst_excess_auc', float('nan')):.3f}"
                f"  {e['worst_attack']}"
            )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
