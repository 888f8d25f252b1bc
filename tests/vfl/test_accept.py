"""Acceptance policies: the host and the arbiter refuse what their own config does not allow,
and the guest sees which party refused and why (in-process, on the session setup)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import JobRefusedError
from protocols.executor import InlineExecutor
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryNetwork
from tests.conftest import ARBITER
from tests.vfl.session_setup import TAGS, Outcome, Trio, run_job, synthetic_tables, trio
from vfl.common import checkpoint as ckpt
from vfl.config import PartyConfig, parse_config
from vfl.fedavg.protocol import FedJob
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.service.accept import (
    check_fed_job,
    check_offer,
    check_parties,
    check_spec,
    host_bottom_params,
)
from vfl.splitnn.job import JobOffer, SplitJob
from vfl.splitnn.session import serve_decryptions
from vfl.splitnn.training import TrainConfig, _host_bottom

BASE = """
[party]
id = "{me}"
role = "{role}"
listen = "127.0.0.1:0"
state_dir = "state"

[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"

[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"

[[peers]]
id = "{other}"
role = "{other_role}"
address = "127.0.0.1:2"

[arbiter]
allow_test_key = true
"""

MARVELL = ProtectConfig(mode=ProtectMode.MARVELL)


def host_config(tmp_path: Path, accept: str = "") -> PartyConfig:
    text = BASE.format(me="retailer", role="host", other="arbiter", other_role="arbiter")
    text += '\n[data]\ncredit = "credit.csv"\nsecret = "secret.csv"\n'
    if accept:
        text += f"\n[accept]\n{accept}\n"
    return parse_config(tomllib.loads(text), source=tmp_path / "retailer.toml")


def arbiter_config(tmp_path: Path, accept: str = "") -> PartyConfig:
    text = BASE.format(me="arbiter", role="arbiter", other="retailer", other_role="host")
    if accept:
        text += f"\n[accept]\n{accept}\n"
    return parse_config(tomllib.loads(text), source=tmp_path / "arbiter.toml")


def job(**train: Any) -> SplitJob:
    config = {"d": 3, "k": 2, "guest_widths": (6, 4), "host_widths": (6, 3), "protect": MARVELL}
    config.update(train)
    return SplitJob(job_id="acc", train=TrainConfig(**config), batch=16, batch_eval=24, epochs=1)


def refused_at_guest(out: Outcome, party: str) -> str:
    """The guest's error message for a job ``party`` refused."""
    assert out.result is None
    mine = [
        e for e in out.errors if isinstance(e, JobRefusedError) and f"{party} refused" in str(e)
    ]
    assert mine, out.errors
    return str(mine[0])


def run(t: Trio, the_job: SplitJob, config: PartyConfig | None, alias: str = "credit") -> Outcome:
    guest, host, splits = synthetic_tables(rows=64)
    accept = None if config is None else (lambda offer: check_offer(config, offer))
    return run_job(
        t,
        the_job,
        guest,
        host,
        splits,
        timeout=10.0,
        host_kwargs={"accept": accept},
        host_request={"data": alias},
    )


@pytest.mark.parametrize(
    ("accept", "the_job", "alias", "needle"),
    [
        ("", job(), "secret2", "data alias 'secret2' is not offered to guests (accept.data)"),
        ('data = ["credit"]', job(), "secret", "data alias 'secret' is not offered"),
        ("", job(d=65), "credit", "d = 65 exceeds accept.max_d = 64"),
        ("max_k = 1", job(), "credit", "k = 2 exceeds accept.max_k = 1"),
        (
            "",
            job(protect=ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)),
            "credit",
            "label protection 'none' is not accepted (accept.protect_modes: gaussian, marvell,",
        ),
        ('job_types = ["psi"]', job(), "credit", "split_nn jobs are not accepted here"),
        ("guests = []", job(), "credit", "bank may not submit jobs here (accept.guests)"),
        # known only once the host has loaded its table (4 columns; the count, 51, which
        # would give them away, stays in the host's log) ...
        (
            "max_host_params = 40",
            job(),
            "credit",
            "the host bottom model would have more parameters than accept.max_host_params = 40 (",
        ),
        # ... and once it has fetched the arbiter's (1024-bit test) key
        ("min_key_bits = 2048", job(), "credit", "the arbiter's key has 1024 bits, fewer than"),
    ],
)
def test_host_refuses_what_its_policy_does_not_allow(
    tmp_path: Path,
    pk: PublicKey,
    sk: PrivateKey,
    accept: str,
    the_job: SplitJob,
    alias: str,
    needle: str,
) -> None:
    """The refusal reaches the guest as JobRefusedError naming the host and the rule."""
    out = run(trio(tmp_path, pk, sk), the_job, host_config(tmp_path, accept), alias)
    message = refused_at_guest(out, "retailer")
    assert needle in message, message
    assert "[accept]" in message  # says what to do


def test_a_refusal_keeps_the_hosts_checkpoints(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    """The policy is checked before anything is written: a refused JOB_START under the id of
    an earlier job does not prune that job's checkpoints."""
    folder = tmp_path / "retailer" / "jobs" / "acc" / "checkpoints"
    ckpt.save(folder, 3, trees={}, big_ints={}, meta={})
    out = run(trio(tmp_path, pk, sk), job(d=99), host_config(tmp_path))
    assert "d = 99" in refused_at_guest(out, "retailer")
    assert ckpt.available_steps(folder) == [3]


def test_an_allowed_job_runs(tmp_path: Path, pk: PublicKey, sk: PrivateKey) -> None:
    """protect none is accepted where the host's policy lists it; the job runs to the end."""
    config = host_config(tmp_path, 'protect_modes = ["none", "marvell"]')
    leak = ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)
    out = run(trio(tmp_path, pk, sk), job(protect=leak), config)
    assert not out.errors and out.result is not None


def arbiter_trio(tmp_path: Path, pk: PublicKey, sk: PrivateKey, config: PartyConfig) -> Trio:
    net = InMemoryNetwork()
    channel = net.channel(ARBITER, tags=TagRegistry(TAGS))

    def admit(body: dict[str, Any], sender: Party) -> None:
        check_spec(config, body, sender)

    service = serve_decryptions(
        channel=channel, public_key=pk, private_key=sk, executor=InlineExecutor(), admit=admit
    )
    return Trio(net=net, arbiter=service, state=tmp_path)


@pytest.mark.parametrize(
    ("accept", "the_job", "needle"),
    [
        ("max_d = 2", job(), "d = 3 exceeds accept.max_d = 2"),
        ("guests = []", job(), "bank may not submit jobs here"),
        ("min_key_bits = 2048", job(), "key of 1024 bits < accept.min_key_bits = 2048"),
    ],
)
def test_arbiter_refuses_what_its_policy_does_not_allow(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey, accept: str, the_job: SplitJob, needle: str
) -> None:
    """The arbiter refuses the JOB_SPEC (J3) of both parties; the guest names it."""
    t = arbiter_trio(tmp_path, pk, sk, arbiter_config(tmp_path, accept))
    out = run(t, the_job, None)
    message = refused_at_guest(out, "arbiter")
    assert needle in message, message


def test_plaintext_needs_allow_plaintext_everywhere(tmp_path: Path) -> None:
    plain = SplitJob(job_id="p", train=TrainConfig(d=3, k=2), encrypted=False)
    offer = JobOffer(guest="bank", job=plain, request={"data": "credit"})
    with pytest.raises(JobRefusedError, match="plaintext jobs are not accepted"):
        check_offer(host_config(tmp_path), offer)
    check_offer(host_config(tmp_path, "allow_plaintext = true"), offer)


def test_host_bottom_params_match_the_model() -> None:
    """The parameter count used by the policy is the model's, without building it."""
    config = TrainConfig(d=5, k=2, host_widths=(7, 9, 3))
    model = _host_bottom(11, config, seed=0)
    assert host_bottom_params(features=11, train=config) == sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("guest", "host", "sender", "needle"),
    [
        ("bank", "bank", "bank", "two different parties"),  # the guest registers alone
        ("bank", "arbiter", "bank", "arbiter is not a configured host"),
        ("retailer", "bank", "retailer", "retailer is not a configured guest"),
        ("bank", "shop", "bank", "shop is not a configured host"),
        ("bank", "retailer", "shop", "shop is neither the guest nor the host"),
    ],
)
def test_the_arbiter_binds_a_job_to_its_configured_parties(
    tmp_path: Path, guest: str, host: str, sender: str, needle: str
) -> None:
    """P1 of the arbiter's policy at its acceptance check: a JOB_SPEC names a configured
    guest and a different configured host, and comes from one of them."""
    config = arbiter_config(tmp_path)
    with pytest.raises(JobRefusedError, match=needle):
        check_parties(config, guest=guest, host=host, sender=Party(sender, Role.GUEST))
    check_parties(config, guest="bank", host="retailer", sender=Party("retailer", Role.HOST))


def test_a_horizontal_job_names_only_configured_clients(tmp_path: Path) -> None:
    config = arbiter_config(tmp_path)
    coordinator = Party("bank", Role.GUEST)
    fed = FedJob(job_id="h", coordinator="bank", clients=(("bank", "a"), ("mallory", "b")))
    with pytest.raises(JobRefusedError, match="mallory is not a configured guest or host"):
        check_fed_job(config, fed, coordinator)
    fed = FedJob(job_id="h", coordinator="bank", clients=(("bank", "a"), ("retailer", "b")))
    check_fed_job(config, fed, coordinator)


SPEC_ARBITER = """
[party]
id = "arbiter"
role = "arbiter"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"
[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"
[[peers]]
id = "bank2"
role = "guest"
address = "127.0.0.1:3"
[[peers]]
id = "retailer"
role = "host"
address = "127.0.0.1:2"
[arbiter]
allow_test_key = true
"""


def test_another_guest_cannot_end_a_registration_or_inject_a_reason(tmp_path: Path) -> None:
    """A second configured guest sends a JOB_SPEC for the bank's job id, naming free text as
    its guest: only it is answered, with a rule that repeats none of its text, and the bank's
    registration goes on (docs/protocol.md §4.4.1)."""
    from types import SimpleNamespace

    from protocols.arbiter.service import ArbiterService, SetupTag
    from protocols.crypto.policy import DecryptionPolicy
    from protocols.envelope import ControlBlock, Envelope
    from vfl.service.accept import check_spec
    from vfl.splitnn.spec import JobSpec

    config = parse_config(tomllib.loads(SPEC_ARBITER), source=tmp_path / "arbiter.toml")
    arbiter = Party("arbiter", Role.ARBITER)
    bank, bank2 = Party("bank", Role.GUEST), Party("bank2", Role.GUEST)
    retailer = Party("retailer", Role.HOST)
    sent: list[Envelope] = []

    class Channel:
        me = arbiter

        def send(self, envelope: Envelope) -> Envelope:
            sent.append(envelope)
            return envelope

        def restore_stream_state(self, *args: object, **kwargs: object) -> None:
            pass

    cipher = SimpleNamespace(encrypted=False, key=SimpleNamespace(key_id=bytes.fromhex("ab" * 8)))
    service = ArbiterService(
        channel=Channel(),  # type: ignore[arg-type]
        cipher=cipher,  # type: ignore[arg-type]
        private_key=None,
        policy=DecryptionPolicy(),
        executor=None,  # type: ignore[arg-type]
    )
    spec = {
        "job_id": "j1",
        "key_id": "ab" * 8,
        "key_bits": 2048,
        "mode": "p1",
        "batch": 16,
        "d": 3,
        "k": 2,
        "batch_eval": 24,
        "guest": "bank",
        "host": "retailer",
        "epochs": 1,
        "steps_per_epoch": 4,
        "eval_steps": 1,
        "eval_rewind": 1,
        "encrypted": True,
    }

    def deliver(sender: Party, body: dict[str, object]) -> None:
        envelope = Envelope(
            job_id="j1",
            sender=sender,
            receiver=arbiter,
            tag=SetupTag.JOB_SPEC,
            run_id="r1",
            body=ControlBlock.from_obj(body),
        )
        service._on_job_spec(
            envelope,
            lambda b: JobSpec.from_json(b).policy(max_resumes=5),
            lambda b, s: check_spec(config, b, s),
        )

    deliver(bank, spec)
    assert sent == []  # waits for the host
    deliver(bank2, {**spec, "guest": "no space left in /arbiter/state (fake)"})
    deliver(bank2, {**spec, "guest": "bank2"})  # a valid spec of its own, disagreeing
    assert {e.receiver for e in sent} == {bank2}
    for reply in sent:
        body = reply.body.obj()  # type: ignore[union-attr]
        assert "no space" not in body["refused"] and "no_space" not in body
    sent.clear()
    deliver(retailer, spec)
    assert {e.receiver for e in sent} == {bank, retailer}
    assert all(e.body.obj() == {"job_id": "j1"} for e in sent)  # type: ignore[union-attr]
