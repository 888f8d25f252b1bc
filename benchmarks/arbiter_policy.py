"""Arbiter policy benchmark: every deviating request is refused and audited, an honest job
is served in full, and the checks cost (almost) nothing (docs/protocol.md §2.6, §5.4).

* ``cases_tried`` / ``cases_refused``: the scripted attacks of issue 15 (a job registered
  alone, a host of the wrong role, steps outside the schedule or behind it, a repeated step
  under a new run, resumes too far back or too often, an arbiter restart between two
  requests, a grant for an unknown model or with another κ, an ``INF_Z`` ciphertext the
  host never produced, a training ciphertext under a grant, a request over a host answer's
  cap) plus ``--random`` (default 2,000) randomised ones (random tags, steps, counts,
  requesters, job and model ids, ciphertext digests of other tags and sessions), all sent
  as envelopes to a real :class:`ArbiterService` over the in-memory transport after an
  honest job was served in full; ``audited`` counts the refusals that reached the
  service's refusal listener (the audit log's hook) with a reason.
* ``honest_requests_served``: the requests of that honest job (every step of its
  schedule), all answered.
* ``policy_overhead``: wall time of an honest split-NN epoch (breast, 2048-bit key,
  in-process, the arbiter's policy state on disk) with the checks, over the same epoch
  with a policy that checks nothing, median of ``--runs`` (9) runs each, alternating, same
  run (target <= 1.02); the epochs' own spread is larger than the checks, so
  ``policy_seconds`` (time spent inside the policy per epoch, its journal's fsyncs
  included) and ``policy_fraction`` (that over the epoch) say what the checks cost.
* ``results_identical``: both variants trained the identical model (test scores equal).

Usage: ``python -m benchmarks.arbiter_policy`` (``--quick`` for a 1024-bit key and 1 run).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: keep benchmarks/ off the import path so `psi` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import tomllib
from typing import Any

import numpy as np

from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import generate_keypair
from protocols.crypto.policy import (
    Admission,
    DecryptionPolicy,
    ciphertext_digests,
)
from protocols.crypto.policy_store import PolicyStore
from protocols.crypto.tensor import encrypt
from protocols.envelope import ControlBlock, Envelope, control_of
from protocols.executor import InlineExecutor, LocalProcessExecutor
from protocols.files import atomic_write
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryNetwork
from vfl.config import ScoringGrant, parse_config
from vfl.data.datasets import data_dir, find
from vfl.data.tables import PartyTable, TableSpec, load_table, split_rows
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.scoring.grants import GrantKeeper
from vfl.scoring.protocol import ScoreTag, grant_id
from vfl.service.accept import check_spec
from vfl.splitnn.inprocess import run_in_process
from vfl.splitnn.job import SplitJob
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode
from vfl.splitnn.training import TrainConfig
from vfl.transfer.session import FtlDecTag

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "arbiter_policy.json"
BANK, RETAILER, ARBITER = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
TARGET_OVERHEAD = 1.02
ARBITER_CONFIG = parse_config(
    tomllib.loads(
        """
[party]
id = "arbiter"
role = "arbiter"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "ca.pem"
certificate = "arbiter.pem"
key = "arbiter.key"
[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"
[[peers]]
id = "retailer"
role = "host"
address = "127.0.0.1:2"
[arbiter]
allow_test_key = true
"""
    ),
    source=Path("arbiter.toml"),
)
TAGS = [DecTag.Z_FWD, DecTag.G_BWD, DecTag.V_WUPD, DecTag.Z_EVAL, DecTag.INF_Z, FtlDecTag.GB]


class Permissive(DecryptionPolicy):
    """The reference: registers jobs but checks nothing and writes nothing."""

    def admit(self, **_: Any) -> Admission:  # type: ignore[override]
        return Admission.NEW


class Timed(DecryptionPolicy):
    """The real policy, timing its own calls and counting what it served."""

    seconds = 0.0
    served = 0

    def admit(self, **kw: Any) -> Admission:  # type: ignore[override]
        t = time.perf_counter()
        try:
            admission = super().admit(**kw)
            Timed.served += admission is Admission.NEW
            return admission
        finally:
            Timed.seconds += time.perf_counter() - t


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip()


# -- the attack harness: envelopes to a real arbiter service -------------------------------


class Harness:
    """A real :class:`ArbiterService` on the in-memory transport, the bank and the retailer
    as raw channels that send whatever they like, and the service's refusals recorded."""

    def __init__(self, key_bits: int, folder: Path) -> None:
        self.pk, self.sk = generate_keypair(bits=key_bits, allow_test_key=key_bits < 2048)
        self.folder = folder
        self.net = InMemoryNetwork()
        tags = TagRegistry(_all_tags())
        self.ch = {p.party_id: self.net.channel(p, tags=tags) for p in (BANK, RETAILER)}
        self.arbiter_ch = self.net.channel(ARBITER, tags=tags)
        self.refusals: list[tuple[str, str]] = []
        self.cipher = PaillierCipher(self.pk)
        self.pool = ObfuscatorPool(self.pk, executor=InlineExecutor())
        self.start()
        self.tried = self.refused = 0
        self.seq = 0

    def start(self) -> None:
        """(Re)start the arbiter's service on its state folder (P9)."""
        self.policy = DecryptionPolicy(store=PolicyStore(self.folder))
        self.service = ArbiterService(
            channel=self.arbiter_ch,
            cipher=self.cipher,
            private_key=self.sk,
            policy=self.policy,
            executor=InlineExecutor(),
        )
        self.service.serve([*DecTag, *FtlDecTag])
        self.service.serve_setup(
            lambda body: JobSpec.from_json(body).policy(max_resumes=2),
            admit=lambda body, sender: check_spec(ARBITER_CONFIG, body, sender),
        )
        self.service.on_refused(lambda env, reason: self.refusals.append((env.job_id, reason)))

    def restart(self) -> None:
        """A restarted arbiter: a new process on the same state folder."""
        self.arbiter_ch.close()
        self.arbiter_ch = self.net.channel(ARBITER, tags=TagRegistry(_all_tags()))
        self.start()

    def send(self, sender: Party, job_id: str, tag: Any, step: int, body: Any, run: str) -> None:
        ch = self.ch[sender.party_id]
        ch.fresh_stream(job_id, [ARBITER])
        key_id = self.pk.key_id if not isinstance(body, ControlBlock) else b""
        envelope = Envelope(
            job_id=job_id,
            sender=sender,
            receiver=ARBITER,
            tag=tag,
            step=step,
            run_id=run,
            key_id=key_id,
            body=body,
        )
        ch.send(envelope)

    def recv(self, party: Party, job_id: str, tag: Any, step: int, run: str) -> Envelope:
        ch = self.ch[party.party_id]
        return ch.recv(job_id=job_id, sender=ARBITER, tag=tag, step=step, run_id=run, timeout=30)

    def exchange(
        self, sender: Party, job_id: str, tag: Any, step: int, body: Any, reply: Any, run: str
    ) -> Envelope:
        self.send(sender, job_id, tag, step, body, run)
        return self.recv(sender, job_id, reply, step, run)

    def attack(
        self,
        sender: Party,
        job_id: str,
        tag: Any,
        step: int,
        body: Any,
        reply: Any = None,
        run: str = "attack",
    ) -> None:
        """One deviating request: it must be refused, with a reason, and audited."""
        before = len(self.refusals)
        got = self.exchange(sender, job_id, tag, step, body, reply or tag, run)
        self.tried += 1
        refused = isinstance(got.body, ControlBlock) and "refused" in control_of(got)
        if refused and len(self.refusals) > before and self.refusals[-1][1]:
            self.refused += 1
        else:
            print(f"NOT REFUSED: {sender.party_id} {job_id} {tag} step {step}")

    def honest(self, sender: Party, job_id: str, tag: Any, step: int, body: Any) -> Envelope:
        got = self.exchange(sender, job_id, tag, step, body, tag, "honest")
        if isinstance(got.body, ControlBlock):
            raise SystemExit(f"an honest request was refused: {control_of(got)}")
        return got

    def cts(self, count: int, width: int = 1) -> Any:
        plain = np.zeros((count, width), dtype=object)
        return encrypt(self.cipher, plain, pool=self.pool, scale=0).to_block()


def _all_tags() -> list[Any]:
    return [DecTag, FtlDecTag, SetupTag, ScoreTag]


def honest_and_scripted(h: Harness, rng: random.Random, n_random: int) -> dict[str, int]:
    """Register and serve an honest job in full, then every scripted and random attack."""
    spec = JobSpec(
        job_id="honest",
        key_id=h.pk.key_id.hex(),
        key_bits=h.pk.bits,
        mode=SplitMode.P1,
        batch=4,
        d=4,
        k=4,
        batch_eval=4,
        guest="bank",
        host="retailer",
        epochs=2,
        steps_per_epoch=3,
        eval_steps=5,
        eval_rewind=2,
    )
    body = ControlBlock.from_obj(spec.to_json())
    # attack: a job registered by the guest alone (itself as host; the arbiter as host)
    for host in ("bank", "arbiter"):
        bad = ControlBlock.from_obj({**spec.to_json(), "job_id": f"alone-{host}", "host": host})
        h.attack(BANK, f"alone-{host}", SetupTag.JOB_SPEC, 0, bad, SetupTag.JOB_READY)
    # the honest registration: both proposals
    for party in (BANK, RETAILER):
        h.send(party, "honest", SetupTag.JOB_SPEC, 0, body, "honest")
    for party in (BANK, RETAILER):
        ready = h.recv(party, "honest", SetupTag.JOB_READY, 0, "honest")
        assert "refused" not in control_of(ready), control_of(ready)
    policy = spec.policy()
    served = 0
    bodies: dict[tuple[str, int], Any] = {}
    for step in range(spec.epochs * spec.steps_per_epoch):
        for tag in (DecTag.Z_FWD, DecTag.G_BWD, DecTag.V_WUPD):
            rule = policy.rule(tag.value)
            assert rule is not None
            who = BANK if rule.requester == "bank" else RETAILER
            bodies[(tag.value, step)] = h.cts(rule.count)
            h.honest(who, "honest", tag, step, bodies[(tag.value, step)])
            served += 1
    for step in range(spec.eval_steps):
        h.honest(BANK, "honest", DecTag.Z_EVAL, step, h.cts(spec.batch_eval * spec.kappa_k))
        served += 1
    last = spec.epochs * spec.steps_per_epoch - 1
    z = DecTag.Z_FWD
    # attack: steps outside the schedule, behind it, repeated under a new run
    for step in (last + 1, 10**6, 10**9, 10**12, 2**63 - 1):
        h.attack(RETAILER, "honest", DecTag.G_BWD, step, h.cts(spec.batch * spec.kappa_d))
    h.attack(BANK, "honest", z, 0, h.cts(spec.batch), run="new-run")
    h.attack(BANK, "honest", z, last, h.cts(spec.batch), run="new-run")
    # attack: a RESUME too far back, from one party only, then too many
    for step in (0, last - 3):
        resume = ControlBlock.from_obj({"step": step, "tag_steps": {}})
        h.send(BANK, "honest", SetupTag.RESUME, step, resume, "r")
        h.attack(RETAILER, "honest", SetupTag.RESUME, step, resume, SetupTag.RESUMED, run="r")
    # an arbiter restart between two identical requests (answered) and two different ones
    h.restart()
    got = h.exchange(BANK, "honest", z, last, bodies[(z.value, last)], z, "lost-reply")
    if isinstance(got.body, ControlBlock):  # a byte-identical repeat is answered again
        raise SystemExit(f"a repeat after the restart was refused: {control_of(got)}")
    h.attack(BANK, "honest", z, last, h.cts(spec.batch), run="after-restart")
    h.attack(BANK, "honest", z, last - 1, h.cts(spec.batch), run="after-restart")
    # scoring: a grant for a model never closed, then the closed model's grant attacks
    GrantKeeper(
        service=h.service,
        channel=h.arbiter_ch,
        state_dir=h.folder / "scoring",
        grant_for=_grant_for,
    )
    grant = {"key_id": h.pk.key_id.hex(), "kappa": spec.kappa_k, "max_rows": 4}
    for model_id, kappa in (("honest", spec.kappa_k), ("never-trained", spec.kappa_k)):
        g = ControlBlock.from_obj({**grant, "model_id": model_id, "kappa": kappa})
        h.attack(BANK, grant_id(model_id), ScoreTag.GRANT_REQ, 1, g, ScoreTag.GRANT)
    for party in (BANK, RETAILER):
        h.send(party, "honest", SetupTag.JOB_DONE, 0, ControlBlock.from_obj({}), "done")
    for party in (BANK, RETAILER):
        h.recv(party, "honest", SetupTag.JOB_DONE, 0, "done")
    h.attack(BANK, "honest", z, last, h.cts(spec.batch), run="after-close")
    g = ControlBlock.from_obj({**grant, "model_id": "honest", "kappa": spec.kappa_k + 1})
    h.attack(BANK, grant_id("honest"), ScoreTag.GRANT_REQ, 2, g, ScoreTag.GRANT)
    g = ControlBlock.from_obj({**grant, "model_id": "honest"})
    ok = h.exchange(BANK, grant_id("honest"), ScoreTag.GRANT_REQ, 3, g, ScoreTag.GRANT, "s1")
    assert "refused" not in control_of(ok), control_of(ok)
    # the retailer registers one answer of 2 rows (cap 1) for session s1
    masked = h.cts(2, spec.kappa_k)
    items = ciphertext_digests(h.pk.key_id, masked.data, 2 * spec.kappa_k)
    bind = ControlBlock.from_obj(
        {
            "group": 5,
            "cap_rows": 1,
            "first": True,
            "digests": base64.b64encode(b"".join(items)).decode(),
        }
    )
    bound = h.exchange(RETAILER, grant_id("honest"), SetupTag.BIND, 5, bind, SetupTag.BOUND, "s1")
    assert "refused" not in control_of(bound)
    h.attack(BANK, grant_id("honest"), SetupTag.BIND, 6, bind, SetupTag.BOUND, run="s1")
    width = len(masked.data) // (2 * spec.kappa_k)
    first_row = type(masked)(data=masked.data[: width * spec.kappa_k], shape=(1, spec.kappa_k))
    for attack_body in (
        h.cts(1, spec.kappa_k),  # a ciphertext the host never produced
        bodies[(z.value, 0)],  # a training ciphertext under the grant (wrong count too)
        h.cts(spec.batch, spec.kappa_k),  # many rows of fresh ciphertexts
        masked,  # both rows of an answer that allows one
    ):
        h.attack(BANK, grant_id("honest"), DecTag.INF_Z, rng.getrandbits(62), attack_body, run="s1")
    h.attack(BANK, grant_id("honest"), DecTag.INF_Z, 77, first_row, run="other-session")
    scripted = h.tried
    # randomised deviations
    job_ids = ["honest", grant_id("honest"), "alone-bank", "nope", "honest.scoring.x", ""]
    used: set[tuple[str, str, int, Any, Party]] = set()
    for _ in range(n_random):
        tag = rng.choice(TAGS)
        sender = rng.choice([BANK, RETAILER])
        job_id = rng.choice(job_ids) or f"random-{rng.getrandbits(32)}"
        step = rng.choice([rng.randrange(0, 16), rng.getrandbits(40), rng.getrandbits(63)])
        count = rng.choice([1, 2, 4, 8, spec.batch, spec.batch_eval, rng.randrange(1, 40)])
        # 30 %: a ciphertext of another tag or step
        body = bodies[rng.choice(list(bodies))] if rng.random() < 0.3 else h.cts(count)
        run = rng.choice(["s1", "r2", "r3", f"run-{rng.getrandbits(16)}"])
        while (job_id, run, step, tag, sender) in used:  # (the transport refuses repeats)
            step += 1
        used.add((job_id, run, step, tag, sender))
        h.attack(sender, job_id, tag, step, body, run=run)
    return {"honest_requests_served": served, "scripted_cases": scripted}


def _grant_for(model_id: str, first: float) -> ScoringGrant:
    return ScoringGrant(model_id, frozenset({"bank"}), 100_000, time.time() + 3600)


# -- the overhead: an honest epoch with and without the checks ------------------------------


def breast() -> tuple[PartyTable, PartyTable, Any]:
    folder = data_dir(os.environ)
    guest = load_table(
        TableSpec(path=find("breast_hetero_guest.csv", folder=folder), label_column="y")
    )
    host = load_table(TableSpec(path=find("breast_hetero_host.csv", folder=folder)))
    shared = np.intersect1d(guest.ids.astype(str), host.ids.astype(str))
    gi = {str(v): i for i, v in enumerate(guest.ids)}
    hi = {str(v): i for i, v in enumerate(host.ids)}
    guest = guest.take(np.array([gi[s] for s in shared]))
    host = host.take(np.array([hi[s] for s in shared]))
    assert guest.labels is not None
    return guest, host, split_rows(guest.labels, test_fraction=0.2, validation_fraction=0.2, seed=0)


def epoch(
    policy: DecryptionPolicy, key_bits: int, executor: Any, work: Path
) -> tuple[float, list[float]]:
    guest, host, splits = breast()
    job = SplitJob(
        job_id="overhead",
        train=TrainConfig(
            d=4,
            k=4,
            guest_widths=(8, 4),
            host_widths=(8, 4),
            protect=ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True),  # comparable
        ),
        batch=32,
        batch_eval=64,
        epochs=1,
    )
    run = run_in_process(
        job=job,
        guest_table=guest,
        host_table=host,
        splits=splits,
        executor=executor,
        state_dir=work,
        key_bits=key_bits,
        allow_test_key=key_bits < 2048,
        w0_seed=3,
        order_seed=b"\x01" * 32,
        host_seed=5,
        policy=policy,
    )
    return run.seconds, list(run.result.test_scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", type=int, default=2000, help="randomised deviations")
    parser.add_argument("--quick", action="store_true", help="1024-bit key, one epoch each")
    parser.add_argument("--runs", type=int, default=9, help="epochs with and without checks")
    args = parser.parse_args()
    bits = 1024 if args.quick else 2048
    runs = 1 if args.quick else args.runs
    rng = random.Random(15)
    with tempfile.TemporaryDirectory() as tmp:
        harness = Harness(bits, Path(tmp) / "policy")
        counts = honest_and_scripted(harness, rng, args.random)
        tried, refused = harness.tried, harness.refused
        audited = sum(1 for _, reason in harness.refusals if reason)
        executor = LocalProcessExecutor(workers=os.cpu_count() or 2)
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        scores: dict[str, list[float]] = {}
        Timed.seconds, Timed.served = 0.0, 0
        try:
            epoch(Permissive(), bits, executor, Path(tmp) / "warm")  # warm the pools' workers
            for i in range(runs):
                for name in ("unchecked", "checked") if i % 2 else ("checked", "unchecked"):
                    policy = (
                        Timed(store=PolicyStore(Path(tmp) / f"store-{i}"))
                        if name == "checked"
                        else Permissive()
                    )
                    wall, scores[name] = epoch(policy, bits, executor, Path(tmp) / f"{name}-{i}")
                    times[name].append(wall)
        finally:
            executor.close()
    checked, unchecked = statistics.median(times["checked"]), statistics.median(times["unchecked"])
    out = {
        "git_commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "key_bits": bits,
        "cases_tried": tried,
        "cases_refused": refused,
        "scripted_cases": counts["scripted_cases"],
        "random_cases": args.random,
        "audited": audited,
        "honest_requests_served": counts["honest_requests_served"] + Timed.served // runs,
        "epoch_requests_served": Timed.served // runs,
        "policy_overhead": round(checked / unchecked, 4),
        "target_policy_overhead": TARGET_OVERHEAD,
        "epoch_wall_s": {
            "checked": {
                "median": round(checked, 2),
                "runs": [round(t, 2) for t in times["checked"]],
            },
            "unchecked": {
                "median": round(unchecked, 2),
                "runs": [round(t, 2) for t in times["unchecked"]],
            },
        },
        "policy_seconds": round(Timed.seconds / max(runs, 1), 4),
        "policy_fraction": round(Timed.seconds / max(runs, 1) / checked, 5),
        # the checks' own share of an epoch: the wall-time ratio above is within the epochs'
        # run-to-run spread, this one is not
        "policy_overhead_direct": round(1 + Timed.seconds / max(runs, 1) / checked, 4),
        "results_identical": scores["checked"] == scores["unchecked"],
        "epoch": "breast (569 rows), batch 32, d = k = 4, P1, in-process, one epoch",
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULT, (json.dumps(out, indent=2) + "\n").encode())
    print(json.dumps(out, indent=2))
    if refused != tried or audited < refused:
        raise SystemExit("a deviating request was served or not audited")


if __name__ == "__main__":
    main()
