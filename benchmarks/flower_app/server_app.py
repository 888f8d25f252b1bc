"""Flower ServerApp: FedAvg over all SuperNodes, timed the way the engine's FedAvg is timed.

Reads ``init.npz`` and ``config.json`` from the run config's ``work-dir``, runs ``rounds``
rounds of train + evaluate on every node (fractions 1.0, weighted by ``num-examples``, no
centralised evaluation) and writes to ``work-dir``:

* ``flower_rounds.json``: ``round1_start`` and ``round_end`` (``time.time()`` at the server;
  a round ends once its evaluate replies are aggregated), the weighted validation ``val_auc``
  and ``val_loss`` per round, and the flwr version. Rewritten after every round; ``done`` is
  true once the final parameters are saved. ``train_replies`` and ``evaluate_replies`` count
  the replies without error per round.
* ``flower_final.npz``: the final global parameters, same keys as ``init.npz``.

Runs only in the Flower venv (``benchmarks/.flower-venv``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

NUM_CLIENTS = 3
ROUNDS_FILE = "flower_rounds.json"
FINAL_FILE = "flower_final.npz"


class TimedFedAvg(FedAvg):
    """FedAvg that records the wall clock of each round and the aggregated validation metrics.

    Parameters
    ----------
    out
        Where to (re)write the per-round record after every round.
    num_clients
        Every round trains and evaluates on exactly this many nodes.
    """

    def __init__(self, out: Path, num_clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=num_clients,
            min_evaluate_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.out = out
        self.num_clients = num_clients
        self.record: dict[str, Any] = {
            "flwr_version": version("flwr"),
            "round1_start": None,
            "round_end": [],
            "val_auc": [],
            "val_loss": [],
            "train_replies": [],
            "evaluate_replies": [],
            "done": False,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the nodes as FedAvg does; round 1 starts once its messages are built."""
        messages = super().configure_train(server_round, arrays, config, grid)
        if server_round == 1 and self.record["round1_start"] is None:
            self.record["round1_start"] = time.time()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the train replies as FedAvg does, counting the ones without error."""
        replies = list(replies)
        self._count(server_round, "train", replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluate replies; that ends the round."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self.record["round_end"].append(time.time())
        self._count(server_round, "evaluate", replies)
        self.record["val_auc"].append(_metric(metrics, "auc"))
        self.record["val_loss"].append(_metric(metrics, "loss"))
        self.write()
        return metrics

    def _count(self, server_round: int, phase: str, replies: list[Message]) -> None:
        """Record how many replies came without error; stop the run if one is missing."""
        ok = sum(not reply.has_error() for reply in replies)
        self.record[f"{phase}_replies"].append(ok)
        if ok < self.num_clients:
            self.write()
            errors = [reply.error.reason for reply in replies if reply.has_error()]
            raise RuntimeError(
                f"round {server_round} {phase}: {ok} of {self.num_clients} replies; {errors}"
            )

    def write(self) -> None:
        """Atomically (re)write the record as JSON."""
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1), encoding="utf-8")
        os.replace(tmp, self.out)


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    """One aggregated metric as a float, ``None`` when missing."""
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    return float(value) if isinstance(value, int | float) else None


def load_arrays(path: Path) -> ArrayRecord:
    """An ``.npz`` of named arrays as an ArrayRecord, keys and order kept."""
    with np.load(path, allow_pickle=False) as npz:
        return ArrayRecord({key: Array(np.ascontiguousarray(npz[key])) for key in npz.files})


def save_arrays(arrays: ArrayRecord, path: Path) -> None:
    """An ArrayRecord as an ``.npz`` of named arrays (written atomically)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{key: array.numpy() for key, array in arrays.items()})
    os.replace(tmp, path)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg from ``init.npz`` for ``config.json``'s rounds and save the results."""
    work = Path(str(context.run_config["work-dir"]))
    cfg = json.loads((work / "config.json").read_text(encoding="utf-8"))
    initial = load_arrays(work / "init.npz")

    strategy = TimedFedAvg(work / ROUNDS_FILE, NUM_CLIENTS)
    train_config = ConfigRecord(
        {
            "lr": float(cfg["lr"]),
            "local-epochs": int(cfg["local_epochs"]),
            "batch": int(cfg["batch"]),
            "seed": int(cfg["seed"]),
            "in-features": int(cfg["in_features"]),
            "widths": [int(w) for w in cfg["widths"]],
        }
    )
    evaluate_config = ConfigRecord(
        {
            "in-features": int(cfg["in_features"]),
            "widths": [int(w) for w in cfg["widths"]],
        }
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["rounds"]),
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    save_arrays(result.arrays, work / FINAL_FILE)
    strategy.record["done"] = True
    strategy.write()
