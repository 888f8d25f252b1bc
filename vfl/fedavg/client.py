"""A client's side of a FedAvg run (steps F2-F7 of :mod:`vfl.fedavg.protocol`).

Roles: this client holds its own rows, its TLS key (it signs its ephemeral key with it) and
the pinned certificates of the other clients; it never sees another client's rows or update,
only the averaged model (and, with two clients, what §7.2 says follows from it).

Files (0600 in 0700 folders, under ``<state_dir>/jobs/<job>/``, a path built with
:func:`protocols.ids.state_path`): ``fedavg/step-<r>/`` the model after
round ``r`` (the two newest are kept, F2), ``model/`` the final model with its column
statistics, ``result.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols import secagg
from protocols.envelope import Envelope, Uint64Block, control_of
from protocols.errors import (
    ConfigError,
    DataError,
    JobRefusedError,
    ProtocolError,
    RunAbortedError,
    VflError,
    peer_reason,
)
from protocols.files import atomic_write, private_dir
from protocols.ids import state_path
from protocols.link import JobLink
from protocols.roles import Party
from protocols.transport.base import Channel
from vfl.common import checkpoint
from vfl.data.features import ImputePolicy
from vfl.data.tables import PartyTable
from vfl.fedavg import aggregate
from vfl.fedavg.protocol import (
    STATS_ROUND,
    FedJob,
    FedResult,
    FedTag,
    RoundAbortedError,
    json_digest,
)
from vfl.fedavg.train import build_model, client_splits, evaluate, local_train, scores
from vfl.privacy.accountant import RdpAccountant
from vfl.report import write_report

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MODEL_DIR = "model"
CHECKPOINTS = "fedavg"
GROUP_WRAP_INFO = b"secagg-v1-group-wrap"
REPLY_SLACK_S = 120.0  # beyond the round timeout, how long a client waits for A


def job_folder(state_dir: Path, job_id: str) -> Path:
    """``<state_dir>/jobs/<job_id>``, made 0700 if missing
    (:class:`~protocols.ids.UnsafePathError` unless the job id is an identifier and the
    folder stays in the state folder)."""
    return private_dir(state_path(state_dir, "jobs", job_id))


class FedClient:
    """One client's run of a FedAvg job.

    Parameters
    ----------
    channel
        This client's channel.
    job
        The job (the same at every client: A checks the digests).
    run_id
        The run, chosen by the coordinator (F1).
    arbiter
        The aggregator.
    table
        This client's rows with labels (binary 0/1).
    signing_key_pem
        This client's TLS private key (PEM): it signs the ephemeral key (F2).
    certificates
        The pinned certificate (PEM) of every other client (F3).
    state_dir
        Where the checkpoints, model and result go.
    seed
        Seeds batch order and DP noise (tests and reproducible experiments only); default:
        the OS CSPRNG.
    progress
        Called with a status dict after each round.
    """

    def __init__(
        self,
        *,
        channel: Channel,
        job: FedJob,
        run_id: str,
        arbiter: Party,
        table: PartyTable,
        signing_key_pem: bytes,
        certificates: Mapping[str, bytes],
        state_dir: Path,
        seed: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.channel, self.job, self.run_id, self.arbiter = channel, job, run_id, arbiter
        self.link = JobLink(channel=channel, job_id=job.job_id, run_id=run_id)
        self.me = channel.me.party_id
        if self.me not in job.client_ids:
            raise ConfigError(f"{self.me} is not a client of job {job.job_id}")
        self.table = table
        self._key_pem = signing_key_pem
        self._certificates = dict(certificates)
        self.folder = job_folder(state_dir, job.job_id)
        self.seed = seed
        self.progress = progress
        self.stopped = False
        self.key_id: str | None = None  # no Paillier key here (the job runner asks)
        self._seeds: dict[str, bytes] = {}
        self._group: bytes | None = None

    # -- public ---------------------------------------------------------------------

    def stop(self) -> None:
        """End the run: a waiting receive raises :class:`RunAbortedError`."""
        self.stopped = True
        self.channel.abort_run(self.job.job_id, self.run_id)

    def run(self) -> FedResult:
        """F2-F6; raises :class:`RoundAbortedError` if A aborts a round (F7). A client that
        fails for any other reason tells A (``ABORT``), which ends the run for everyone."""
        try:
            return self._run()
        except (RoundAbortedError, JobRefusedError, RunAbortedError):
            raise  # A ended the run, or this party stopped it
        except Exception as exc:
            try:
                reason = peer_reason(exc)  # the rule only; the details stay in this log
                self.link.send(self.arbiter, FedTag.ABORT, 0, {"reason": reason})
            except Exception:  # noqa: BLE001 - A may be the reason; the error below stands
                logger.info("job %s: could not tell the aggregator", self.job.job_id)
            raise

    def _run(self) -> FedResult:
        job = self.job
        x, y = self._features_and_labels()
        train, val, test = client_splits(y, job=job)
        if len(train) < 2:
            raise DataError(f"{self.table.source}: too few rows to train on")
        model = build_model(job, in_features=x.shape[1])
        rounds_held = checkpoint.available_steps(self.folder / CHECKPOINTS)
        keys = self._join(x, model, rounds_held)  # F2
        self._derive_seeds(keys)  # F3
        resume = int(control_of(keys)["resume_round"])
        history: list[dict[str, Any]] = []
        curve: list[dict[str, float]] = []  # this client's own loss and validation per round
        dp_steps = 0
        if resume > 0:
            saved = checkpoint.load(self.folder / CHECKPOINTS, resume)
            model.load_state_dict(saved.tree("model"))
            history = list(saved.meta.get("history", []))
            curve = list(saved.meta.get("curve", []))
            dp_steps = int(saved.meta.get("dp_steps", 0))
            logger.info("job %s: %s resumes after round %d", job.job_id, self.me, resume)
        checkpoint.prune(self.folder / CHECKPOINTS, keep=[resume])
        if job.group_mask:
            self._group = self._group_seed()  # F3
        standardizer = self._statistics(x[train])  # F4
        xs = standardizer.transform(x)

        def report(round_no: int, epsilon: float | None) -> dict[str, Any]:
            """EVAL of the current model: validation rows, test rows after the last round."""
            out: dict[str, Any] = {"validation": evaluate(model, xs[val], y[val])}
            if len(curve) < round_no:
                train_loss = evaluate(model, xs[train], y[train]).get("log_loss", 0.0)
                curve.append(
                    {"epoch": round_no - 1.0, "train_loss": train_loss, **out["validation"]}
                )
            if round_no == job.rounds and len(test):
                out["test"] = evaluate(model, xs[test], y[test])
            out["epsilon"] = epsilon
            self.link.send(self.arbiter, FedTag.EVAL, round_no, out)
            return out

        x_train = torch.from_numpy(xs[train])
        y_train = torch.from_numpy(y[train].astype(np.float32))
        accountant = (
            None
            if job.dp is None
            else RdpAccountant(
                q=min(1.0, job.batch / len(train)),
                sigma=job.dp.noise_multiplier,
                delta=job.dp.delta,
                steps=dp_steps,
            )
        )
        generator = torch.Generator().manual_seed(
            secrets.randbits(63)
            if self.seed is None
            else (self.seed * 1_000_003 + resume) % (1 << 63)
        )
        own: dict[str, Any] = {}
        if resume > 0:  # F5: the resumed round's report again (A kept no history)
            own = report(resume, None if accountant is None else accountant.epsilon())
        for round_no in range(resume + 1, job.rounds + 1):  # F5
            order = self._recv_control(FedTag.ROUND, round_no)
            participants = tuple(str(p) for p in order["participants"])
            if order.get("previous"):
                history.append(order["previous"])
            started = time.monotonic()
            if self.me in participants:
                steps = local_train(model, x_train, y_train, job=job, generator=generator)
                if accountant is not None:
                    accountant.step(steps)
                    dp_steps = accountant.steps
                update = aggregate.parameter_vector(model)
                average = self._secure_sum(
                    update,
                    weight=len(train),
                    up=FedTag.UPDATE,
                    down=FedTag.AGG,
                    step=round_no,
                    round_no=round_no,
                    participants=participants,
                )
            else:
                average = self._receive_sum(FedTag.AGG, round_no, round_no)
            aggregate.load_parameter_vector(model, average)
            checkpoint.save(
                self.folder / CHECKPOINTS,
                round_no,
                trees={"model": model.state_dict()},
                big_ints={},
                meta={
                    "history": history,
                    "curve": curve,
                    "dp_steps": dp_steps,
                    "run_id": self.run_id,
                },
            )
            checkpoint.prune(self.folder / CHECKPOINTS, keep=[round_no - 1, round_no])
            epsilon = None if accountant is None else accountant.epsilon()
            own = report(round_no, epsilon)
            if self.progress is not None:
                self.progress(
                    {
                        "round": round_no,
                        "rounds": job.rounds,
                        "round_s": round(time.monotonic() - started, 3),
                        "validation": own["validation"],
                        "combined": history[-1] if history else None,
                        "epsilon": epsilon,
                    }
                )
        done = self._recv_control(FedTag.DONE, 0)  # F6
        merged = {int(h["round"]): h for h in [*history, *done.get("history", [])]}
        history = [merged[r] for r in sorted(merged)]
        model_dir = self._save_model(model, standardizer)
        result = FedResult(
            job_id=job.job_id,
            rounds=job.rounds,
            history=tuple(history),
            own=own,
            epsilon=None if accountant is None else accountant.epsilon(),
            model_dir=str(model_dir),
        )
        atomic_write(self.folder / RESULT_FILE, json.dumps(result.to_json()).encode(), mode=0o600)
        self._report(result, curve, model=model, xs=xs[test], y=y[test], rows=test)
        if self.progress is not None and history:
            self.progress({"round": job.rounds, "rounds": job.rounds, "combined": history[-1]})
        logger.info("job %s: %s done after %d rounds", job.job_id, self.me, job.rounds)
        return result

    def _report(
        self,
        result: FedResult,
        curve: list[dict[str, float]],
        *,
        model: torch.nn.Module,
        xs: np.ndarray,
        y: np.ndarray,
        rows: np.ndarray,
    ) -> None:
        """This client's report of the final model on its own test rows (``report/`` in its
        job folder: ROC, PR, calibration and loss plots, test scores with ids); a report that
        cannot be written (e.g. one class among the test rows) is logged, the job stands."""
        if not len(rows) or len(np.unique(y)) < 2:
            logger.info("job %s: no report (its test rows hold one class)", self.job.job_id)
            return
        ids = self.table.take(self.table.id_rows()).ids[rows]
        try:
            write_report(
                self.folder / "report",
                summary={
                    "job_id": result.job_id,
                    "rounds": result.rounds,
                    "epsilon": result.epsilon,
                },
                test_labels=y,
                test_scores=scores(model, xs),
                history=curve,
                ids=[str(v) for v in ids],
            )
        except (OSError, ValueError, VflError) as exc:
            logger.error("job %s: the report was not written: %s", self.job.job_id, exc)

    # -- data -----------------------------------------------------------------------

    def _features_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        table = self.table.take(self.table.id_rows())  # no PSI here drops rows without an id
        if table.labels is None:
            raise DataError(f"{table.source}: no label column {self.job.label_column!r}")
        y = np.asarray(table.labels, dtype=np.float64)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{table.source} row {row}, column {self.job.label_column!r}: FedAvg jobs train "
                "a binary model; labels must be 0 or 1"
            )
        x = np.asarray(table.features, dtype=np.float64)
        if self.job.impute is ImputePolicy.ERROR and not np.isfinite(x).all():
            row, col = np.argwhere(~np.isfinite(x))[0]
            raise DataError(
                f"{table.source} row {row}, column {table.columns[col]!r}: missing value; fix "
                'the file or set impute = "mean" in the job'
            )
        return x, y

    # -- messages -------------------------------------------------------------------

    def _recv(self, tag: FedTag, step: int) -> Envelope:
        """The next ``tag`` at ``step`` from A, or raise on ``ABORT`` (F7)."""
        timeout = self.job.round_timeout_s + REPLY_SLACK_S
        envelope = self.link.recv_any(self.arbiter, (tag, FedTag.ABORT), timeout=timeout)
        if envelope.tag == FedTag.ABORT.value:
            body = control_of(envelope)
            reason = body.get("reason", "no reason given")
            if body.get("refused"):
                raise JobRefusedError(f"job {self.job.job_id}: {str(reason)[:300]}")
            raise RoundAbortedError(
                f"job {self.job.job_id}: the aggregator aborted the run: {str(reason)[:300]}"
            )
        if envelope.step != step:
            raise ProtocolError(
                f"job {self.job.job_id}: expected {tag.value} step {step} from "
                f"{self.arbiter.party_id}, got step {envelope.step}"
            )
        return envelope

    def _recv_control(self, tag: FedTag, step: int) -> dict[str, Any]:
        return control_of(self._recv(tag, step))

    def _join(self, x: np.ndarray, model: torch.nn.Module, rounds_held: Sequence[int]) -> Envelope:
        """F2: send JOIN with the signed ephemeral key; return A's KEYS (F3)."""
        self._own, public = secagg.new_keypair()
        signature = secagg.sign_key(
            key_pem=self._key_pem,
            job_id=self.job.job_id,
            run_id=self.run_id,
            party_id=self.me,
            public=public,
        )
        self.channel.fresh_stream(self.job.job_id, (self.arbiter,))
        body = {
            "job": self.job.to_json(),
            "job_sha256": self.job.digest(),
            "columns_sha256": json_digest(list(self.table.columns)),
            "features": int(x.shape[1]),
            "init_sha256": aggregate.model_digest(model),
            "rounds_held": [int(r) for r in rounds_held],
            "public": public.hex(),
            "signature": signature.hex(),
        }
        self.link.send(self.arbiter, FedTag.JOIN, 0, body)
        return self._recv(FedTag.KEYS, 0)

    def _derive_seeds(self, keys: Envelope) -> None:
        """F3: verify every other client's signed key against its pinned certificate, then
        derive the pairwise seeds."""
        publics: dict[str, bytes] = {}
        for entry in control_of(keys).get("keys", []):
            party_id = str(entry["party"])
            public = bytes.fromhex(str(entry["public"]))
            if party_id == self.me:
                continue
            if party_id not in self.job.client_ids:
                raise ProtocolError(f"job {self.job.job_id}: KEYS names {party_id}, no client")
            certificate = self._certificates.get(party_id)
            if certificate is None:
                raise ConfigError(
                    f"no pinned certificate for client {party_id}: a FedAvg client verifies "
                    f"every other client's key; add a [[peers]] entry for {party_id} with its "
                    "certificate to this party's config"
                )
            secagg.verify_key(
                certificate_pem=certificate,
                job_id=self.job.job_id,
                run_id=self.run_id,
                party_id=party_id,
                public=public,
                signature=bytes.fromhex(str(entry["signature"])),
            )
            publics[party_id] = public
        missing = set(self.job.client_ids) - set(publics) - {self.me}
        if missing:
            raise ProtocolError(f"job {self.job.job_id}: KEYS lacks {sorted(missing)}")
        self._publics = publics
        self._seeds = secagg.pairwise_seeds(
            me=self.me, own=self._own, peers=publics, job_id=self.job.job_id
        )

    def _group_seed(self) -> bytes:
        """F3: ``K_group``, from the pairwise secret (two clients) or drawn by the first client
        and sent to each other one wrapped under a key derived from their pairwise seed."""
        clients = self.job.client_ids
        if len(clients) == 2:
            (peer,) = (c for c in clients if c != self.me)
            return secagg.group_seed_for_two(
                me=self.me,
                own=self._own,
                peer=peer,
                peer_public=self._publics[peer],
                job_id=self.job.job_id,
            )
        first = clients[0]
        if self.me == first:
            group = os.urandom(32)
            wrapped = {}
            for peer in clients[1:]:
                nonce = os.urandom(12)
                sealed = AESGCM(self._wrap_key(peer)).encrypt(nonce, group, self._wrap_aad(peer))
                wrapped[peer] = (nonce + sealed).hex()
            self.link.send(self.arbiter, FedTag.GROUP, 0, {"wrapped": wrapped})
            return group
        body = self._recv_control(FedTag.GROUP, 0)
        try:
            blob = bytes.fromhex(str(body["wrapped"]))
            return AESGCM(self._wrap_key(first)).decrypt(
                blob[:12], blob[12:], self._wrap_aad(self.me)
            )
        except Exception as exc:  # noqa: BLE001 - any failure is a tampered or wrong seed
            raise ProtocolError(
                f"job {self.job.job_id}: the group seed from {first} does not open "
                f"({type(exc).__name__}); the run is aborted"
            ) from None

    def _wrap_key(self, peer: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=GROUP_WRAP_INFO).derive(
            self._seeds[peer]
        )

    def _wrap_aad(self, receiver: str) -> bytes:
        return f"{self.job.job_id}|{self.run_id}|{receiver}".encode()

    def _secure_sum(
        self,
        values: np.ndarray,
        *,
        weight: int,
        up: FedTag,
        down: FedTag,
        step: int,
        round_no: int,
        participants: Sequence[str],
    ) -> np.ndarray:
        """Encode, check, mask and send ``n·values`` and ``n`` (F5); return the average."""
        x = secagg.encode_update(values, weight=weight, clients=len(participants))
        peers = {p: self._seeds[p] for p in participants if p != self.me}
        first = min(participants)
        y = secagg.mask_update(
            x,
            me=self.me,
            seeds=peers,
            round_no=round_no,
            group_seed=self._group if self.me == first else None,
        )
        self.link.send(
            self.arbiter, up, step, Uint64Block(y.astype("<u8").tobytes(), shape=y.shape)
        )
        return self._receive_sum(down, step, round_no)

    def _receive_sum(self, tag: FedTag, step: int, round_no: int) -> np.ndarray:
        envelope = self._recv(tag, step)
        if not isinstance(envelope.body, Uint64Block):
            raise ProtocolError(f"{tag.value} from the aggregator must carry uint64 values")
        total = np.frombuffer(envelope.body.data, dtype="<u8").astype(np.uint64)
        if self._group is not None:
            total = secagg.remove_group_mask(total, group_seed=self._group, round_no=round_no)
        average, _ = secagg.decode_sum(total)
        return average

    def _statistics(self, x_train: np.ndarray) -> aggregate.Standardizer:
        """F4: global column means and deviations by two secure aggregations."""
        clients = self.job.client_ids
        columns = x_train.shape[1]
        first = self._secure_sum(
            aggregate.first_moments(x_train),
            weight=len(x_train),
            up=FedTag.STATS,
            down=FedTag.STATS_SUM,
            step=0,
            round_no=STATS_ROUND,
            participants=clients,
        )
        frac, mean, a = aggregate.centre(first, columns)
        second = self._secure_sum(
            aggregate.second_moments(x_train, mean, a),
            weight=len(x_train),
            up=FedTag.STATS,
            down=FedTag.STATS_SUM,
            step=1,
            round_no=STATS_ROUND + 1,
            participants=clients,
        )
        return aggregate.finish(second, frac, mean, a)

    def _save_model(self, model: torch.nn.Module, standardizer: aggregate.Standardizer) -> Path:
        """F6: the final model, its column statistics and a manifest, atomically."""
        state = {
            "job": self.job.to_json(),
            "columns": list(self.table.columns),
            "mean": standardizer.mean.tolist(),
            "scale": standardizer.scale.tolist(),
            "big_ints": {},
        }
        tmp = checkpoint.write_folder(
            self.folder, ".tmp-model", tensors=model.state_dict(), state=state
        )
        digest = hashlib.sha256((tmp / "tensors.safetensors").read_bytes()).hexdigest()
        atomic_write(
            tmp / "manifest.json", json.dumps({"tensors_sha256": digest}).encode(), mode=0o600
        )
        final = self.folder / MODEL_DIR
        checkpoint.replace_folder(tmp, final)
        return final


def load_fed_model(folder: Path) -> tuple[torch.nn.Module, aggregate.Standardizer, FedJob]:
    """A client's final model (``model/`` of a finished job), checked against its manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        data = (folder / "tensors.safetensors").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["tensors_sha256"]:
            raise ValueError("tensors do not match the manifest")
        saved = checkpoint.read_folder(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"model {folder} is unreadable or altered: {exc}") from None
    job = FedJob.from_json(saved.meta["job"])
    model = build_model(job, in_features=len(saved.meta["columns"]))
    model.load_state_dict(saved.tensors)
    standardizer = aggregate.Standardizer(
        mean=np.asarray(saved.meta["mean"]), scale=np.asarray(saved.meta["scale"])
    )
    return model, standardizer, job
