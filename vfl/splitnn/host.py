"""The host H of a split-NN job: follows steps J2-J8 of :mod:`vfl.splitnn.session`
(docs/protocol.md §4.4.1)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.envelope import ControlBlock, Envelope, IndexBlock
from protocols.errors import (
    DataError,
    JobRefusedError,
    ProtocolError,
    TransportError,
    VflError,
    peer_reason,
)
from protocols.executor import Executor
from protocols.ids import state_path
from protocols.link import DATA_REFUSED, REFUSED
from protocols.roles import Party
from protocols.transport.base import Channel
from vfl.common import checkpoint as ckpt
from vfl.data.preprocess import widest
from vfl.data.tables import PartyTable
from vfl.splitnn.interactive import HostLayer, SplitTag
from vfl.splitnn.job import JobOffer, JobTag, Schedule, SplitJob
from vfl.splitnn.session import PartySession, resume_point
from vfl.splitnn.training import (
    HostObserver,
    HostTrainer,
    joint_init_component,
)

logger = logging.getLogger(__name__)


class HostSession(PartySession):
    """H's side of a job: follows the guest's J2-J7.

    ``table_for(request)`` returns H's rows in the PSI order for the job (from its own data
    alias and PSI result named in the guest's request; a :class:`VflError` refuses the job);
    ``seed`` seeds H's own initialisation (None: OS CSPRNG). ``request_for(request)`` is H's
    own reading of the guest's request (its ``[psi]`` policy fixes the id column; a
    :class:`VflError` refuses the job). ``accept(offer)`` is H's
    acceptance policy: called at J2 before anything is written, again with H's column count
    once its table is loaded and again with the arbiter's key once fetched; a
    :class:`VflError` it raises refuses the job (``JOB_ACCEPT{refused}`` with its
    :func:`peer_reason`, never its full message) and :meth:`run` raises
    :class:`JobRefusedError`.
    """

    ROLE = "host"

    def __init__(
        self,
        *,
        channel: Channel,
        guest: Party,
        arbiter: Party,
        table_for: Callable[[dict[str, Any]], PartyTable],
        executor: Executor,
        state_dir: Path,
        seed: int | None = None,
        pool_target: int = 2000,
        timeout: float = 600.0,
        allow_test_key: bool = False,
        pool_executor: Executor | None = None,
        accept: Callable[[JobOffer], None] | None = None,
        observer: HostObserver | None = None,
        request_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            channel=channel,
            peer=guest,
            arbiter=arbiter,
            executor=executor,
            state_dir=state_dir,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
        )
        self.table_for, self.seed = table_for, seed
        self.pool_target = pool_target
        self.accept = accept or (lambda offer: None)
        self.observer = observer
        self.request_for = request_for or (lambda request: request)

    def _refuse(self, job_id: str, exc: VflError) -> JobRefusedError:
        """J2: tell G why the job is refused (the rule, :func:`peer_reason`; the details only
        in H's log); the error for :meth:`run` to raise."""
        reason = str(exc)[:500]
        public = peer_reason(exc)
        fields = {DATA_REFUSED: True} if isinstance(exc, DataError) else {}
        self.link.send(self.peer, JobTag.JOB_ACCEPT, 0, {REFUSED: public, **fields})
        logger.warning("refused job %s of %s: %s", job_id, self.peer.party_id, reason)
        return JobRefusedError(
            f"refused job {job_id} of {self.peer.party_id}: {reason}", public=public
        )

    def run(self, start: Envelope) -> HostTrainer:
        """Serve the job that ``start`` (a ``JOB_START``) opens, until ``JOB_END``."""
        torch.set_num_threads(1)
        if not isinstance(start.body, ControlBlock):
            raise ProtocolError("JOB_START carries no control block")
        body = start.body.obj()
        self._begin(start.job_id, start.run_id)
        job_dir = state_path(self.state_dir, "jobs", start.job_id)  # checked at decode too
        ckpt_dir = job_dir / "checkpoints"
        self.next_run(job_dir)
        self.request = dict(body.get("request", {}))
        try:
            self.request = self.request_for(self.request)  # H's own reading of it
            job = SplitJob.from_host_part(body)
            if job.job_id != start.job_id:
                raise ProtocolError(
                    "JOB_START names another job than its envelope",
                    public="JOB_START names another job than its envelope",
                )
            offer = JobOffer(guest=self.peer.party_id, job=job, request=self.request)
            self.accept(offer)  # J2, before anything is written
        except VflError as exc:
            raise self._refuse(start.job_id, exc) from None
        guest_steps = [int(s) for s in body.get("checkpoints", [])]
        if not guest_steps:  # a new job under an old id: nothing to resume
            ckpt.prune(ckpt_dir, keep=())
            shutil.rmtree(ckpt_dir / ckpt.BEST, ignore_errors=True)
        mine = ckpt.available_steps(ckpt_dir)
        env = self.link.recv(self.peer, JobTag.FIT_ROWS)
        if not isinstance(env.body, IndexBlock):
            raise ProtocolError("FIT_ROWS carries no row indices")
        try:
            table = self.table_for(self.request)
            fit_rows = env.body.indices()
            try:
                schedule = Schedule(**{k: int(v) for k, v in dict(body["schedule"]).items()})
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("JOB_START holds no valid schedule") from None
            if schedule.steps_per_epoch != len(fit_rows) // job.batch:
                raise ProtocolError("JOB_START's steps per epoch do not match its FIT_ROWS")
            schedule.check_at_host(job=job, rows=len(table), fit_rows=len(fit_rows))
            # the size check: the widest encoding of H's columns, never the width fitted on
            # the rows G chose (it would answer "do these rows share a category?", §4.4.3)
            offer = dataclasses.replace(offer, features=widest(table))
            self.accept(offer)
            x = self._preprocess(job_dir, table, fit_rows)
            key = self.public_key()  # J1
            self.accept(dataclasses.replace(offer, key_bits=key.bits, key_id=self.key_id))
        except TransportError:
            raise  # not the job's fault: the guest tries again with a new run
        except VflError as exc:
            raise self._refuse(job.job_id, exc) from None
        spec = job.spec(
            key, guest=self.peer.party_id, host=self.channel.me.party_id, schedule=schedule
        )
        self.link.send(self.peer, JobTag.JOB_ACCEPT, 0, {"checkpoints": mine})
        self.arbiter_client.register(spec.to_json())  # J3
        pool = self.pool(key, encrypted=job.encrypted)
        layer = HostLayer(
            link=self.link,
            peer=self.peer,
            arbiter=self.arbiter,
            spec=spec,
            cipher=self.cipher(key, encrypted=job.encrypted),
            pool=pool,
            executor=self.executor,
            fp=FixedPointConfig(),
        )
        trainer = HostTrainer(
            layer=layer, x=x, config=job.train, seed=self.seed, observer=self.observer
        )
        t = resume_point(guest_steps, mine)  # J4
        try:
            if t is None:
                w0_seed = None if self.seed is None else self.seed + 1000
                trainer.init(joint_init_component(job.train.d, job.train.k, seed=w0_seed))
                step = 0
                self._checkpoint(ckpt_dir, trainer, 0)
            else:
                eval_step = int(body.get("eval_step", 0))
                self.resume_at_arbiter(t, eval_step)
                trainer.restore(ckpt.load(ckpt_dir, t))
                step = t
            pool.keep_filled(self.pool_target)
            self._serve(job, layer, trainer, ckpt_dir, step)
        finally:
            pool.close()
        return trainer

    def _checkpoint(self, folder: Path, trainer: HostTrainer, step: int) -> None:
        trees, big, meta = trainer.state()
        ckpt.save(folder, step, trees=trees, big_ints=big, meta=meta)
        ckpt.prune(folder, keep=(step,))

    def _serve(
        self, job: SplitJob, layer: HostLayer, trainer: HostTrainer, folder: Path, step: int
    ) -> None:
        wanted = (JobTag.BEST, JobTag.USE_BEST, JobTag.JOB_END, SplitTag.BATCH, SplitTag.EVAL_BATCH)
        while True:
            env = self.link.recv_any(self.peer, wanted)  # this run's only (R2)
            if env.tag == SplitTag.BATCH.value:
                if env.step != step:
                    raise ProtocolError(f"BATCH for step {env.step}, expected step {step}")
                trainer.step(step, layer.rows_of(env, job.batch))  # J5
                layer.wait_ack(step)
                step += 1
                self._checkpoint(folder, trainer, step)
            elif env.tag == SplitTag.EVAL_BATCH.value:
                trainer.evaluate(env.step, layer.rows_of(env, job.batch_eval))
            elif env.tag == JobTag.BEST.value:
                ckpt.snapshot_best(folder, step)
            elif env.tag == JobTag.USE_BEST.value:
                if (folder / ckpt.BEST).is_dir():
                    trainer.restore(ckpt.load(folder, ckpt.BEST))
            else:
                self.export(
                    job=job,
                    spec=layer.spec,
                    module=trainer.bottom,
                    big_ints=layer.state(),
                    data={
                        "alias": str(self.request.get("data", "")),
                        "id_column": str(self.request.get("id_column", "id")),
                    },
                )
                self.finish_at_arbiter()  # J8
                logger.info("job %s finished at the host after %d steps", job.job_id, step)
                return
