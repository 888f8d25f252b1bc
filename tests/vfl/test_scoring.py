"""Scoring after training (docs/protocol.md §5, tests I1-I3) and the arbiter's scoring policy."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.fixedpoint import decode, encode, ring
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, Envelope
from protocols.errors import PolicyViolationError
from protocols.executor import InlineExecutor
from protocols.transport.base import Channel, MessageFilter
from psi.canon import IdType, prepare_ids
from psi.protocol import PsiMode, PsiOptions, PsiTag, run_guest, run_host
from psi.result import read_array, read_result, write_result
from tests.conftest import ARBITER, RETAILER
from tests.vfl.session_setup import Trio, run_job, synthetic_tables, trio
from vfl.config import ScoringGrant
from vfl.data.tables import PartyTable
from vfl.scoring.grants import GrantKeeper
from vfl.scoring.protocol import ScoreTag, ScoringClient, ScoringHost, grant_id
from vfl.splitnn.job import SplitJob
from vfl.splitnn.saved import SavedModel, load_model
from vfl.splitnn.spec import DecTag
from vfl.splitnn.training import TrainConfig, guest_scores

JOB = "score-model"


@dataclasses.dataclass
class Setup:
    t: Trio
    guest: PartyTable
    host: PartyTable
    gm: SavedModel
    hm: SavedModel
    grants: dict[str, ScoringGrant]
    pk: PublicKey
    sk: PrivateKey


def record(channel: Channel, sent: list[Envelope]) -> None:
    original = channel.send

    def send(envelope: Envelope) -> Envelope:
        sent.append(envelope)
        return original(envelope)

    channel.send = send  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pk: PublicKey, sk: PrivateKey) -> Setup:
    guest, host, splits = synthetic_tables(rows=160)
    config = TrainConfig(d=3, k=2, guest_widths=(6, 4), host_widths=(6, 3), learning_rate=0.05)
    t = trio(tmp_path_factory.mktemp("scoring"), pk, sk)
    job = SplitJob(job_id=JOB, train=config, batch=16, batch_eval=24, epochs=1)
    out = run_job(t, job, guest, host, splits, host_request={"data": "h", "id_column": "id"})
    assert not out.errors, out.errors
    grants = {JOB: ScoringGrant(JOB, frozenset({"bank"}), 10_000, time.time() + 3600)}
    GrantKeeper(
        service=t.arbiter,
        channel=t.channels["arbiter"],
        grant_for=lambda model_id, first: grants[model_id],
        state_dir=t.state / "arbiter",
    )
    return Setup(
        t=t,
        guest=guest,
        host=host,
        gm=load_model(t.state / "bank", JOB),
        hm=load_model(t.state / "retailer", JOB),
        grants=grants,
        pk=pk,
        sk=sk,
    )


@pytest.fixture
def session(setup: Setup) -> Iterator[tuple[ScoringClient, list[Envelope], list[Envelope]]]:
    """A guest client and a host service on fresh channels; what each sent."""
    t = setup.t
    g_ch, h_ch = t.channel("bank"), t.channel("retailer")
    g_sent: list[Envelope] = []
    h_sent: list[Envelope] = []
    record(g_ch, g_sent)
    record(h_ch, h_sent)
    host = ScoringHost(
        channel=h_ch,
        arbiter=ARBITER,
        state_dir=t.state / "retailer",
        executor=InlineExecutor(),
        table_for=lambda alias, column, columns: setup.host,
        public_key=lambda: setup.pk,
        list_rows=lambda psi_job, **_: (
            read_array(t.state / "retailer", psi_job, "list_rows"),
            int(read_result(t.state / "retailer", psi_job)[0]["peer_list_size"]),
        ),
    )
    client = ScoringClient(
        channel=g_ch,
        host=RETAILER,
        arbiter=ARBITER,
        model=setup.gm,
        executor=InlineExecutor(),
        public_key=setup.pk,
        timeout=20,
    )
    yield client, g_sent, h_sent
    client.close()
    host.close()
    g_ch.close()
    h_ch.close()


def harness(setup: Setup, guest_rows: np.ndarray, host_rows: list[int | None]) -> np.ndarray:
    """The plaintext model from both parties' exports, in the protocol's fixed point."""
    gm, hm, n = setup.gm, setup.hm, setup.pk.n
    fp = hm.fixed_point
    w = gm.big_ints["wg"] + hm.big_ints["e"]  # P1: the shares add up over the integers
    bottom = hm.host_module()
    x_h = hm.preprocessor.transform(setup.host)
    with torch.no_grad():
        alpha_all = bottom(torch.tensor(x_h, dtype=torch.float32)).double().numpy()
        default = bottom(torch.zeros(1, x_h.shape[1])).double().numpy()
    alpha = np.vstack([default if r is None else alpha_all[r : r + 1] for r in host_rows])
    a_hat = encode(alpha, scale=fp.f_a, bound=fp.a_max)
    z = decode(ring(a_hat.dot(w), n), n, scale=fp.f_z, bound=fp.z_bound(3))
    x_g = gm.preprocessor.transform(setup.guest.take(guest_rows))
    return guest_scores(gm.guest_module(), gm.config.task, z, x_g)


def test_export_holds_only_each_partys_own_parts(setup: Setup) -> None:
    """Model export: safetensors + manifest, each party its own parts, owner-only."""
    g, h = setup.gm.manifest, setup.hm.manifest
    assert g["role"] == "guest" and h["role"] == "host"
    assert g["key_id"] == h["key_id"] == setup.pk.key_id.hex()
    assert g["columns"] == ["a", "b", "c"] and h["columns"] == ["p", "q", "r", "s"]
    assert set(setup.gm.big_ints) == {"wg"} and set(setup.hm.big_ints) == {"e", "enc_wg"}
    assert "roc_auc" in g["metrics"] and not h["metrics"]
    assert not any(k.startswith("top") for k in setup.hm.weights)
    for folder in (setup.gm.folder, setup.hm.folder):
        assert {p.name for p in folder.iterdir()} == {
            "manifest.json",
            "state.json",
            "tensors.safetensors",
        }
        assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir())


def test_i1_i2_online_scores_equal_the_combined_exports(
    setup: Setup, session: tuple[ScoringClient, list[Envelope], list[Envelope]]
) -> None:
    """I1: online scores == the plaintext model in fixed point (|diff| < 1e-6). I2: the
    pseudonym finds the record, decoys come back as valid ciphertexts, A sees uniform values;
    an id the host lacks gets the default embedding."""
    client, g_sent, h_sent = session
    client.open_online(id_type=IdType.GENERIC)
    ids = list(setup.guest.ids)
    got, want = [], []
    for row in range(0, 40):
        decoys = [ids[(row + 7) % 160], ids[(row + 11) % 160]] if row % 2 else []
        got.append(client.score_one(ids[row], setup.guest.take(np.array([row])), decoys=decoys))
        want.append(harness(setup, np.array([row]), [row])[0])
    assert np.max(np.abs(np.array(got) - np.array(want))) < 1e-6
    stranger = dataclasses.replace(setup.guest.take(np.array([0])), ids=np.array(["new"]))
    unknown = client.score_one("new", stranger)
    assert abs(unknown - harness(setup, np.array([0]), [None])[0]) < 1e-6
    # I2: each reply has one valid ciphertext row per pseudonym (real + decoys)
    replies = [e for e in h_sent if e.tag == ScoreTag.INF_F1.value]
    assert [r.body.shape[0] for r in replies[:4] if isinstance(r.body, CipherBlock)] == [1, 3, 1, 3]
    # A decrypts only masked values: uniform on [0, n)
    masked = [e for e in g_sent if e.tag == DecTag.INF_Z.value]
    cipher = PaillierCipher(setup.pk)
    values = [
        int(setup.sk.decrypt(c)) / int(setup.pk.n)
        for e in masked
        if isinstance(e.body, CipherBlock)
        for c in EncryptedTensor.from_block(e.body, cipher=cipher, key_id=e.key_id).values.flat
    ]
    assert len(values) == 41 and stats.kstest(values, "uniform").pvalue > 0.001


def test_i3_batch_guest_only_scores(
    setup: Setup, session: tuple[ScoringClient, list[Envelope], list[Envelope]]
) -> None:
    """I3: after a GUEST_ONLY PSI, H returns [[Ẑ]] for every position of A_H (and the default
    row); G decrypts only its matched positions; scores equal the plaintext model's."""
    client, g_sent, h_sent = session
    t = setup.t
    # the scoring population: 30 of the training customers and 10 the host does not know
    rows = np.arange(100, 140)
    new = setup.guest.take(rows)
    new = dataclasses.replace(
        new, ids=np.array([*new.ids[:30], *[f"stranger{i}" for i in range(10)]], dtype=object)
    )
    gp = prepare_ids(list(new.ids), id_type=IdType.GENERIC)
    hp = prepare_ids(list(setup.host.ids), id_type=IdType.GENERIC)
    g_ch, h_ch = client.channel, t.channels["retailer"]
    box = {}

    def host_psi() -> None:
        hello = h_ch.recv_any(MessageFilter.for_tags(PsiTag.HELLO), timeout=20)
        box["h"] = run_host(channel=h_ch, hello_envelope=hello, ids=hp, executor=InlineExecutor())

    thread = threading.Thread(target=host_psi)
    thread.start()
    result = run_guest(
        channel=g_ch,
        host=RETAILER,
        job_id="score-psi",
        ids=gp,
        executor=InlineExecutor(),
        options=PsiOptions(mode=PsiMode.GUEST_ONLY),
    )
    thread.join()
    write_result(t.state / "retailer", "score-psi", box["h"])
    assert result.rows is not None and result.peer_positions is not None
    assert len(result.rows) == 30
    out = client.score_batch(
        new, psi_job="score-psi", rows=result.rows, positions=result.peer_positions
    )
    host_rows: list[int | None] = [*range(100, 130), *[None] * 10]
    want = harness(setup, rows, host_rows)
    assert np.max(np.abs(out.scores.reshape(-1) - want.reshape(-1))) < 1e-6
    assert out.host_known.tolist() == [True] * 30 + [False] * 10
    z_rows = sum(
        e.body.shape[0]
        for e in h_sent
        if e.tag == ScoreTag.INF_F1.value and isinstance(e.body, CipherBlock)
    )
    assert z_rows == 160 + 1  # every position of A_H, then the default row
    decrypted = sum(
        e.body.shape[0]
        for e in g_sent
        if e.tag == DecTag.INF_Z.value and isinstance(e.body, CipherBlock)
    )
    assert decrypted == 30 + 1  # only J and the default row


def test_scoring_outside_the_arbiters_policy_is_refused(
    setup: Setup, session: tuple[ScoringClient, list[Envelope], list[Envelope]]
) -> None:
    client, _, _ = session
    grants, now = setup.grants, time.time()
    try:
        grants[JOB] = ScoringGrant(JOB, frozenset({"someone-else"}), 10_000, now + 60)
        with pytest.raises(PolicyViolationError, match="may not score"):
            client.open_online()
        grants[JOB] = ScoringGrant(JOB, frozenset({"bank"}), 10_000, now - 1)
        with pytest.raises(PolicyViolationError, match="expired"):
            client.open_online()
        used = setup.t.arbiter.policy.counts(grant_id(JOB)).get(DecTag.INF_Z.value, 0)
        grants[JOB] = ScoringGrant(JOB, frozenset({"bank"}), used + 1, now + 60)
        client.open_online()
        row = setup.guest.take(np.array([3]))
        client.score_one(str(row.ids[0]), row)  # the last row of the quota
        with pytest.raises(PolicyViolationError, match="quota"):
            client.score_one(str(row.ids[0]), row)
    finally:
        grants[JOB] = ScoringGrant(JOB, frozenset({"bank"}), 10_000, now + 3600)
