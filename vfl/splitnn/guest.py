"""The guest G of a split-NN job: drives steps J1-J8 of :mod:`vfl.splitnn.session`
(docs/protocol.md §4.4.1)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.envelope import IndexBlock
from protocols.errors import (
    ConfigError,
    DataError,
    ProtocolError,
    VflError,
)
from protocols.executor import Executor
from protocols.files import atomic_write
from protocols.ids import state_path
from protocols.link import raise_if_refused
from protocols.roles import Party
from protocols.transport.base import Channel
from vfl.common import checkpoint as ckpt
from vfl.common.decision import Decision, DecisionConfig
from vfl.common.metrics import binary_metrics, selection_metric, task_metrics
from vfl.common.seeds import RunSeeds, fresh_seed, job_scope
from vfl.data.tables import BatchOrder, PartyTable, Splits
from vfl.models.split import Task
from vfl.privacy.label_dp import LabelDpAccount, account, randomize_labels
from vfl.privacy.label_protection import ProtectMode
from vfl.report import write_report
from vfl.splitnn.interactive import GuestLayer
from vfl.splitnn.job import JobTag, Progress, Schedule, SplitJob, SplitResult
from vfl.splitnn.saved import config_to_json
from vfl.splitnn.session import PartySession, log_progress, resume_point
from vfl.splitnn.training import (
    GuestTrainer,
    joint_init_component,
    resolve_pos_weight,
)

logger = logging.getLogger(__name__)

BEST_VALIDATION = "best_validation.npy"  # the kept model's validation scores (J6)


class GuestSession(PartySession):
    """G's side of a job: J1-J7 driven from here.

    Parameters
    ----------
    channel, host, arbiter
        G's channel and its peers.
    job
        The job to run.
    table
        G's rows in the PSI order, with labels.
    splits
        Train / validation / test rows (positions in ``table``), test rows untouched until J7.
    executor
        Worker processes for the Paillier work on the critical path.
    pool_executor
        Worker processes that fill the obfuscator pool in the background (default:
        ``executor``); the services give them a higher nice value so they only use idle CPU.
    state_dir
        Where this party keeps the job's checkpoints and result (``<state_dir>/jobs/<job>``).
    seed
        The job's seed (docs/protocol.md §4.4.2; :mod:`vfl.common.seeds`): every random draw
        of this party (batch order, W_0 component, protection noise, ``rr_labels``) is keyed
        by it under this party's local secret, so the same seed reruns the job bit for bit
        and no peer can predict the draws. None: a fresh seed, recorded in ``progress.json``,
        ``result.json`` and the model's manifest.
    w0_seed, order_seed
        Raw seeds of the W_0 component and the batch order instead of the keyed ones (tests
        and benchmarks that compare the protocol with the float reference of the same draws).
    progress
        Called after every step and validation (default: a log line every 10 s).
    after_step
        Called with the number of steps done after each step's checkpoint and ``STEP_ACK``
        (the services' test hold, ``[testing] allow_hold``; may raise to end the run).
    decision
        How a binary model's scores become probabilities and decisions: calibration and
        threshold fitted on the validation rows at J7 (:mod:`vfl.common.decision`), saved
        with the model; None: the default :class:`DecisionConfig`.
    report_dir
        Where J7 writes the job's report (:func:`vfl.report.write_report`; default
        ``<job folder>/report``).
    """

    ROLE = "guest"

    def __init__(
        self,
        *,
        channel: Channel,
        host: Party,
        arbiter: Party,
        job: SplitJob,
        table: PartyTable,
        splits: Splits,
        executor: Executor,
        state_dir: Path,
        seed: int | None = None,
        w0_seed: int | None = None,
        order_seed: bytes | None = None,
        pool_target: int = 2000,
        timeout: float = 600.0,
        allow_test_key: bool = False,
        progress: Callable[[Progress], None] | None = None,
        host_request: dict[str, Any] | None = None,
        pool_executor: Executor | None = None,
        after_step: Callable[[int], None] | None = None,
        decision: DecisionConfig | None = None,
        report_dir: Path | None = None,
    ) -> None:
        super().__init__(
            channel=channel,
            peer=host,
            arbiter=arbiter,
            executor=executor,
            state_dir=state_dir,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
        )
        if table.labels is None:
            raise ConfigError("the guest's table has no label column")
        self.labels: np.ndarray = table.labels
        self.train_labels = self.labels  # ỹ under rr_labels, set in run()
        self.job, self.table, self.splits = job, table, splits
        self.pool_target = pool_target
        self.seed_scope = job_scope(
            {
                # not its id, nor whether it encrypts: plaintext mode draws the same
                **{k: v for k, v in job.host_part().items() if k not in ("job_id", "encrypted")},
                "train": config_to_json(job.train),
                "data": (host_request or {}).get("data", ""),
            }
        )
        self.seeds = RunSeeds.at(
            state_dir, fresh_seed() if seed is None else seed, scope=self.seed_scope
        )
        self.host_request = dict(host_request or {})
        self.w0_seed = w0_seed
        self.order_seed = order_seed or self.seeds.digest("batch-order")
        self.progress = progress or log_progress()
        self.after_step = after_step
        self.job_dir = state_path(state_dir, "jobs", job.job_id)
        self.decision_config = decision or DecisionConfig()
        self.report_dir = report_dir or self.job_dir / "report"
        self.ckpt_dir = self.job_dir / "checkpoints"
        self.resumed_from: int | None = None
        self._epoch_orders: dict[int, list[np.ndarray]] = {}
        self.steps_per_epoch = len(splits.train) // job.batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{len(splits.train)} training rows are fewer than one batch of {job.batch}"
            )

    # -- bookkeeping that survives restarts ------------------------------------------

    def _load_progress(self) -> dict[str, Any]:
        path = self.job_dir / "progress.json"
        if path.is_file():
            out: dict[str, Any] = json.loads(path.read_text())
            return out
        return {
            "history": [],
            "eval_step": 0,
            "best_epoch": -1,
            "seed": self.seeds.seed,
            "order_seed": self.order_seed.hex(),
            "rr_seed": format(self.seeds.integer("rr-labels", bits=128), "x"),  # §4.7.2 step 1
        }

    def _save_progress(self, state: dict[str, Any]) -> None:
        atomic_write(self.job_dir / "progress.json", json.dumps(state).encode(), mode=0o600)

    # -- J1-J7 -----------------------------------------------------------------------

    def run(self) -> SplitResult:
        """Run (or resume) the job to the end; returns the test metrics and scores."""
        torch.set_num_threads(1)
        started = time.monotonic()
        job = self.job
        self._begin(job.job_id, f"run{self.next_run(self.job_dir)}")
        key = self.public_key()  # J1
        state = self._load_progress()
        if "seed" in state:  # a resumed run keeps its first run's seed
            self.seeds = RunSeeds.at(self.state_dir, int(state["seed"]), scope=self.seed_scope)
        self.order_seed = bytes.fromhex(state["order_seed"])
        mine = ckpt.available_steps(self.ckpt_dir)
        schedule = Schedule.of(
            splits=self.splits, batch=job.batch, batch_eval=job.batch_eval, epochs=job.epochs
        )
        start = dict(
            job.host_part(),
            request=self.host_request,
            checkpoints=mine,
            eval_step=state["eval_step"],
            schedule=asdict(schedule),
        )
        self.link.send(self.peer, JobTag.JOB_START, 0, start)  # J2
        self.link.send(self.peer, JobTag.FIT_ROWS, 0, IndexBlock.from_indices(self.splits.train))
        accepted = raise_if_refused(
            self.link.control(self.peer, JobTag.JOB_ACCEPT),
            sender=self.peer,
            what=f"job {job.job_id}",
            refuses_job=True,
        )
        theirs = [int(s) for s in accepted["checkpoints"]]
        spec = job.spec(
            key, guest=self.channel.me.party_id, host=self.peer.party_id, schedule=schedule
        )
        self.arbiter_client.register(spec.to_json())  # J3

        x = self._preprocess(self.job_dir, self.table, self.splits.train)
        cipher = self.cipher(key, encrypted=job.encrypted)
        pool = self.pool(key, encrypted=job.encrypted)
        layer = GuestLayer(
            link=self.link,
            peer=self.peer,
            arbiter=self.arbiter,
            spec=spec,
            cipher=cipher,
            pool=pool,
            executor=self.executor,
            fp=FixedPointConfig(),
        )
        self.train_labels = self._randomized_labels(x, state)
        trainer = GuestTrainer(
            layer=layer,
            x=x,
            y=self.train_labels,
            config=job.train,
            steps_per_epoch=self.steps_per_epoch,
            rng=self.seeds.generator("protect"),
            row_keys=self.table.file_rows,
            pos_weight=resolve_pos_weight(job.train, self.train_labels[self.splits.train]),
        )
        t = resume_point(mine, theirs)  # J4
        self.resumed_from = t
        if mine and t is None:
            raise ProtocolError(
                f"job {job.job_id}: the host holds none of the guest's checkpoints {mine}; "
                "the shared weights are lost, start a new job"
            )
        try:
            if t is None:
                trainer.init(
                    joint_init_component(
                        job.train.d,
                        job.train.k,
                        seed=self.seeds.integer("w0") if self.w0_seed is None else self.w0_seed,
                    )
                )
                step = 0
                # the batch-order and rr_labels seeds first: a restart before checkpoint 0 then
                # draws neither again (§4.7.2 step 1)
                self._save_progress(state)
                self._checkpoint(trainer, 0)
            else:
                self.resume_at_arbiter(t, int(state["eval_step"]))
                trainer.restore(ckpt.load(self.ckpt_dir, t))
                step = t
                logger.info("job %s resumed at step %d (run %s)", job.job_id, t, self.run_id)
            setup_s = time.monotonic() - started
            pool.keep_filled(self.pool_target)  # generated while waiting, from here on
            result = self._train(layer, trainer, state, step, setup_s)
        finally:
            pool.close()
        return result

    def privacy(self) -> LabelDpAccount:
        """The accountant's statement for this job (ε only for ``rr_labels``, §4.7.2)."""
        protect = self.job.train.protect
        formal = protect.mode is ProtectMode.RR_LABELS
        return account(mode=protect.mode.value, epsilon=protect.epsilon if formal else None)

    def _randomized_labels(self, x: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The labels training and validation use: ``ỹ`` under ``rr_labels`` (§4.7.2), else y."""
        protect = self.job.train.protect
        if protect.mode is not ProtectMode.RR_LABELS:
            return self.labels
        rows = np.concatenate([self.splits.train, self.splits.validation])
        return randomize_labels(
            self.labels,
            rows=rows,
            x=x,
            epsilon=protect.epsilon,
            prior=protect.rr_prior,
            seed=int(state["rr_seed"], 16),
        )

    def _checkpoint(self, trainer: GuestTrainer, step: int) -> None:
        trees, big, meta = trainer.state()
        ckpt.save(self.ckpt_dir, step, trees=trees, big_ints=big, meta=meta)
        ckpt.prune(self.ckpt_dir, keep=(step - 1, step))

    def _orders(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epoch_orders:
            order = BatchOrder(self.order_seed, batch_size=self.job.batch)
            self._epoch_orders = {epoch: order.epoch(self.splits.train, epoch)}
        return self._epoch_orders[epoch]

    def _train(
        self,
        layer: GuestLayer,
        trainer: GuestTrainer,
        state: dict[str, Any],
        step: int,
        setup_s: float,
    ) -> SplitResult:
        job, spe = self.job, self.steps_per_epoch
        total = job.epochs * spe
        t0, first = time.monotonic(), step
        train_s = eval_s = 0.0
        while True:
            epochs_done = step // spe
            if step % spe == 0 and len(state["history"]) < epochs_done:  # J6
                t_eval = time.monotonic()
                self._validate(layer, trainer, state, epochs_done - 1, step)
                eval_s += time.monotonic() - t_eval
            if step >= total or self._should_stop(state):
                break
            t_step = time.monotonic()
            epoch, i = divmod(step, spe)
            orders = self._orders(epoch)
            trainer.step(step, orders[i])  # J5
            self._checkpoint(trainer, step + 1)
            layer.ack(step)
            step += 1
            train_s += time.monotonic() - t_step
            elapsed = time.monotonic() - t0
            rate = (step - first) * job.batch / max(elapsed, 1e-9)
            self.progress(
                Progress(
                    job_id=job.job_id,
                    epoch=epoch,
                    epochs=job.epochs,
                    step=step,
                    total_steps=total,
                    rows_per_s=rate,
                    eta_s=(total - step) * job.batch / max(rate, 1e-9),
                    loss=trainer.losses[-1],
                )
            )
            if self.after_step is not None:
                self.after_step(step)
        return self._finish(layer, trainer, state, setup_s, train_s, eval_s)

    def _should_stop(self, state: dict[str, Any]) -> bool:
        history = state["history"]
        return bool(history) and len(history) - 1 - state["best_epoch"] >= self.job.patience

    def _scores(
        self, layer: GuestLayer, trainer: GuestTrainer, rows: np.ndarray, state: dict[str, Any]
    ) -> np.ndarray:
        """Scores for ``rows`` through EVAL batches of exactly ``batch_eval`` rows."""
        b = self.job.batch_eval
        out = []
        for start in range(0, len(rows), b):
            chunk = rows[start : start + b]
            padded = np.resize(chunk, b)  # the policy count is fixed: pad by repeating rows
            z_h = layer.evaluate(state["eval_step"], padded)
            state["eval_step"] += 1
            out.append(trainer.scores(z_h, padded)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros(0)

    def _validate(
        self, layer: GuestLayer, trainer: GuestTrainer, state: dict[str, Any], epoch: int, step: int
    ) -> None:
        rows = self.splits.validation
        metrics: dict[str, float] = {}
        if len(rows):  # without validation rows: no early stopping, the last epoch is kept
            scores = self._scores(layer, trainer, rows, state)
            metrics = task_metrics(self.job.train.task, self.train_labels[rows], scores)
        spe = self.steps_per_epoch
        metrics["train_loss"] = float(np.mean(trainer.losses[-spe:])) if trainer.losses else 0.0
        metrics["epoch"] = epoch
        state["history"].append(metrics)
        best = state["best_epoch"]
        key, higher = selection_metric(self.job.train.task)
        previous = state["history"][best].get(key) if best >= 0 else None
        if (
            previous is None
            or key not in metrics
            or (metrics[key] > previous if higher else metrics[key] < previous)
        ):
            state["best_epoch"] = epoch
            if len(rows):  # the kept model's validation scores: J7 calibrates on them
                self._save_scores(BEST_VALIDATION, scores)
            ckpt.snapshot_best(self.ckpt_dir, step)
            self.link.send(self.peer, JobTag.BEST, epoch, {"step": step})
        self._save_progress(state)
        logger.info(
            "job %s epoch %d: validation %s",
            self.job.job_id,
            epoch,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"),
        )
        self.progress(
            Progress(
                job_id=self.job.job_id,
                epoch=epoch,
                epochs=self.job.epochs,
                step=step,
                total_steps=self.job.epochs * spe,
                rows_per_s=0.0,
                eta_s=0.0,
                loss=metrics["train_loss"],
                validation=metrics,
            )
        )

    def _save_scores(self, name: str, scores: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(scores, dtype=np.float64), allow_pickle=False)
        atomic_write(self.job_dir / name, buffer.getvalue(), mode=0o600)

    def _decision(self, state: dict[str, Any]) -> Decision | None:
        """J7: calibration and threshold of a binary model, fitted on the kept model's
        validation scores and the guest's true labels (never sent; :mod:`vfl.common.decision`)."""
        rows, path = self.splits.validation, self.job_dir / BEST_VALIDATION
        if self.job.train.task is not Task.BINARY or not len(rows) or not path.is_file():
            return None
        scores = np.load(path, allow_pickle=False)
        if len(scores) != len(rows):
            return None
        try:
            return Decision.fit(self.decision_config, labels=self.labels[rows], scores=scores)
        except DataError as exc:  # e.g. one class among the validation rows
            logger.warning("job %s: no calibration or threshold: %s", self.job.job_id, exc)
            return None

    def _report(
        self,
        result: SplitResult,
        scores: np.ndarray,
        calibrated: np.ndarray | None,
        decision: Decision | None,
    ) -> None:
        """J7: the job's report (ROC, PR, calibration and loss plots, test scores with ids)
        under :attr:`report_dir`; a report that cannot be written is logged, the job stands."""
        rows = self.splits.test
        if self.job.train.task is not Task.BINARY or not len(rows):
            return
        try:
            files = write_report(
                self.report_dir,
                summary={
                    "job_id": result.job_id,
                    "best_epoch": result.best_epoch,
                    "epochs_run": result.epochs_run,
                    "seed": result.seed,
                    "privacy": result.privacy,
                },
                test_labels=self.labels[rows],
                test_scores=scores,
                history=result.history,
                ids=result.test_ids,
                decision=decision,
                calibrated=calibrated,
            )
        except (OSError, ValueError, VflError) as exc:
            logger.error("job %s: the report was not written: %s", self.job.job_id, exc)
            return
        logger.info("job %s: report in %s", self.job.job_id, files.report.parent)

    def _finish(
        self,
        layer: GuestLayer,
        trainer: GuestTrainer,
        state: dict[str, Any],
        setup_s: float,
        train_s: float,
        eval_s: float,
    ) -> SplitResult:
        """J7."""
        job = self.job
        self.link.send(self.peer, JobTag.USE_BEST, 0, {})
        if state["best_epoch"] >= 0:
            trainer.restore(ckpt.load(self.ckpt_dir, ckpt.BEST))
        t_test = time.monotonic()
        rows = self.splits.test
        scores = self._scores(layer, trainer, rows, state)
        test = task_metrics(job.train.task, self.labels[rows], scores) if len(rows) else {}
        self._save_progress(state)
        self.link.send(self.peer, JobTag.JOB_END, 0, {})
        decision = self._decision(state)
        calibrated = None if decision is None else decision.calibrate(scores)
        result = SplitResult(
            job_id=job.job_id,
            epochs_run=len(state["history"]),
            best_epoch=int(state["best_epoch"]),
            history=state["history"],
            test=test,
            test_scores=scores.tolist(),
            privacy=self.privacy().to_json(),
            timings={
                "setup_s": setup_s,
                "train_s": train_s,
                "eval_s": eval_s,
                "test_s": time.monotonic() - t_test,
            },
            test_ids=[str(v) for v in self.table.ids[rows]],
            seed=int(state.get("seed", self.seeds.seed)),
            decision=None if decision is None else decision.to_json(),
            test_calibrated=(
                {}
                if calibrated is None or not len(rows)
                else binary_metrics(self.labels[rows], calibrated)
            ),
        )
        atomic_write(
            self.job_dir / "result.json", json.dumps(result.to_json()).encode(), mode=0o600
        )
        self.export(
            job=job,
            spec=layer.spec,
            module=trainer.models,
            big_ints={"wg": layer.wg},
            data={
                "host_alias": self.host_request.get("data", ""),
                "id_column": self.host_request.get("id_column", "id"),
            },
            metrics=test,
            extra={
                "seed": result.seed,
                "seed_key": self.seeds.fingerprint(),
                "decision": result.decision,
            },
        )
        self._report(result, scores, calibrated, decision)
        self.finish_at_arbiter()  # J8
        self.final_trainer = trainer
        return result
