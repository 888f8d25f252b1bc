"""Secure aggregation's cryptographic layer.

See docs/protocol.md §7.1; tests H1, H2, H3, H5 of §8.5.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from protocols import secagg
from protocols.errors import ConfigError, SecAggError, UpdateOverflowError
from protocols.roles import Party, Role
from protocols.transport.tls import TlsIdentity, create_demo_pki, load_demo_identity

PARTIES = (Party("bank", Role.GUEST), Party("retailer", Role.HOST), Party("shop", Role.HOST))
IDS = tuple(p.party_id for p in PARTIES)
JOB, RUN = "job-secagg", "run-1"


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsIdentity]:
    folder: Path = tmp_path_factory.mktemp("secagg-pki")
    create_demo_pki(folder, list(PARTIES))
    return {pid: load_demo_identity(folder, pid) for pid in IDS}


def fixed_key(tag: int) -> X25519PrivateKey:
    """A deterministic X25519 key, so statistical tests do not depend on chance."""
    return X25519PrivateKey.from_private_bytes(bytes([tag]) * 32)


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fixed_seeds(ids: tuple[str, ...], *, job_id: str = JOB) -> dict[str, dict[str, bytes]]:
    keys = {pid: fixed_key(i + 1) for i, pid in enumerate(ids)}
    publics = {pid: raw_public(k) for pid, k in keys.items()}
    return {
        pid: secagg.pairwise_seeds(me=pid, own=keys[pid], peers=publics, job_id=job_id)
        for pid in ids
    }


def signed_setup(
    ids: tuple[str, ...], identities: dict[str, TlsIdentity]
) -> tuple[dict[str, X25519PrivateKey], dict[str, bytes], dict[str, dict[str, bytes]]]:
    """S1 and S2 as the protocol runs them: sign, verify every peer, derive seeds."""
    keys: dict[str, X25519PrivateKey] = {}
    announced: dict[str, tuple[bytes, bytes]] = {}
    for pid in ids:
        keys[pid], public = secagg.new_keypair()
        signature = secagg.sign_key(
            key_pem=identities[pid].key_pem, job_id=JOB, run_id=RUN, party_id=pid, public=public
        )
        announced[pid] = (public, signature)
    seeds: dict[str, dict[str, bytes]] = {}
    for me in ids:
        for peer, (public, signature) in announced.items():
            if peer != me:
                secagg.verify_key(
                    certificate_pem=identities[peer].certificate_pem,
                    job_id=JOB,
                    run_id=RUN,
                    party_id=peer,
                    public=public,
                    signature=signature,
                )
        peers = {p: pk for p, (pk, _) in announced.items() if p != me}
        seeds[me] = secagg.pairwise_seeds(me=me, own=keys[me], peers=peers, job_id=JOB)
    return keys, {p: pk for p, (pk, _) in announced.items()}, seeds


def client_data(m: int, size: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(20240611 + m)
    values = [rng.normal(scale=0.5, size=size) for _ in range(m)]
    weights = [int(w) for w in rng.integers(1, 5000, size=m)]
    return values, weights


# ---------------------------------------------------------------------------
# H1: the masks cancel; decoded average == plaintext FedAvg


@pytest.mark.parametrize("m", [2, 3])
def test_h1_masks_cancel_and_average_matches_plaintext(
    m: int, identities: dict[str, TlsIdentity]
) -> None:
    ids = IDS[:m]
    _, _, seeds = signed_setup(ids, identities)
    values, weights = client_data(m, 257)
    xs = [secagg.encode_update(v, weight=n, clients=m) for v, n in zip(values, weights)]
    ys = [secagg.mask_update(x, me=pid, seeds=seeds[pid], round_no=7) for pid, x in zip(ids, xs)]
    for x, y in zip(xs, ys):
        assert not np.array_equal(x, y)
    total = secagg.sum_updates(ys)
    # Σ y_i == Σ x_i (mod 2^64) exactly, checked with Python integers.
    expected = [sum(int(x[k]) for x in xs) % secagg.RING for k in range(len(xs[0]))]
    assert [int(t) for t in total] == expected
    assert np.array_equal(total, secagg.sum_updates(xs))

    average, samples = secagg.decode_sum(total)
    plain = sum(n * v for n, v in zip(weights, values)) / sum(weights)
    assert samples == sum(weights)
    assert average.dtype == np.float64 and average.shape == (257,)
    assert np.max(np.abs(average - plain)) <= 2.0**-secagg.F_H * m


@pytest.mark.parametrize("m", [2, 3])
def test_h1_group_mask_hides_the_sum_from_the_aggregator(
    m: int, identities: dict[str, TlsIdentity]
) -> None:
    ids = IDS[:m]
    keys, publics, seeds = signed_setup(ids, identities)
    if m == 2:
        group = secagg.group_seed_for_two(
            me=ids[0], own=keys[ids[0]], peer=ids[1], peer_public=publics[ids[1]], job_id=JOB
        )
        other = secagg.group_seed_for_two(
            me=ids[1], own=keys[ids[1]], peer=ids[0], peer_public=publics[ids[0]], job_id=JOB
        )
        assert group == other
        assert group != seeds[ids[0]][ids[1]]
    else:
        group = bytes(range(32))  # how m > 2 clients share K_group is the protocol's business
    values, weights = client_data(m, 64)
    xs = [secagg.encode_update(v, weight=n, clients=m) for v, n in zip(values, weights)]
    ys = [
        secagg.mask_update(
            x, me=pid, seeds=seeds[pid], round_no=2, group_seed=group if pid == ids[0] else None
        )
        for pid, x in zip(ids, xs)
    ]
    seen_by_aggregator = secagg.sum_updates(ys)
    plain_sum = secagg.sum_updates(xs)
    assert not np.array_equal(seen_by_aggregator, plain_sum)
    unmasked = secagg.remove_group_mask(seen_by_aggregator, group_seed=group, round_no=2)
    assert np.array_equal(unmasked, plain_sum)
    average, samples = secagg.decode_sum(unmasked)
    plain = sum(n * v for n, v in zip(weights, values)) / sum(weights)
    assert samples == sum(weights)
    assert np.max(np.abs(average - plain)) <= 2.0**-secagg.F_H * m


def test_group_mask_only_from_the_lowest_participant() -> None:
    seeds = fixed_seeds(IDS)
    x = secagg.encode_update(np.zeros(4), weight=1, clients=3)
    with pytest.raises(SecAggError, match="lowest-ordered participant"):
        secagg.mask_update(x, me="shop", seeds=seeds["shop"], round_no=0, group_seed=bytes(32))


def test_the_guard_suffices_for_m_clients_at_the_bound() -> None:
    m, limit = 4, (2**63 - 1) // 4
    for sign in (1, -1):
        value = sign * float(np.nextafter(2.0**61, 0)) / 2**secagg.F_H
        xs = [secagg.encode_update(np.array([value]), weight=1, clients=m) for _ in range(m)]
        average, samples = secagg.decode_sum(secagg.sum_updates(xs))
        assert samples == m
        assert average[0] == pytest.approx(value)
        assert abs(int(xs[0].view(np.int64)[0])) <= limit


# ---------------------------------------------------------------------------
# H2: the aggregator's view of one masked update


@pytest.mark.parametrize("me", IDS)
@pytest.mark.parametrize("structured", [False, True])
def test_h2_single_masked_update_looks_uniform(me: str, structured: bool) -> None:
    n = 2000
    seeds = fixed_seeds(IDS)
    if structured:
        values = np.sin(np.linspace(0, 20, n - 1)) + np.linspace(-1, 1, n - 1)
        x = secagg.encode_update(values, weight=37, clients=3)
    else:
        x = secagg.encode_update(np.zeros(n - 1), weight=0, clients=3)
    y = secagg.mask_update(x, me=me, seeds=seeds[me], round_no=5)
    uniform = y.astype(np.float64) / 2.0**64
    assert stats.kstest(uniform, "uniform").pvalue > 0.01
    if structured:
        corr = np.corrcoef(y.astype(np.float64), x.view(np.int64).astype(np.float64))[0, 1]
        assert abs(corr) < 4 / np.sqrt(n)


# ---------------------------------------------------------------------------
# H3: key agreement, fresh masks, the counter-block rule, signed keys


def test_h3_pairwise_keys_agree_both_ways() -> None:
    keys = {pid: secagg.new_keypair() for pid in IDS}
    publics = {pid: pk for pid, (_, pk) in keys.items()}
    seeds = {
        pid: secagg.pairwise_seeds(me=pid, own=sk, peers=publics, job_id=JOB)
        for pid, (sk, _) in keys.items()
    }
    for a in IDS:
        assert set(seeds[a]) == set(IDS) - {a}
        for b in IDS:
            if a != b:
                assert seeds[a][b] == seeds[b][a]
                assert len(seeds[a][b]) == 32
    assert len({seeds["bank"]["retailer"], seeds["bank"]["shop"], seeds["retailer"]["shop"]}) == 3
    # the job id is the HKDF salt: another job gives other seeds from the same keys
    other = secagg.pairwise_seeds(
        me="bank", own=keys["bank"][0], peers=publics, job_id="another-job"
    )
    assert other["shop"] != seeds["bank"]["shop"]


def test_h3_masks_differ_per_round_and_per_pair() -> None:
    seeds = fixed_seeds(IDS)
    bank_retailer = seeds["bank"]["retailer"]
    bank_shop = seeds["bank"]["shop"]
    r0 = secagg.keystream_words(bank_retailer, round_no=0, count=16)
    r1 = secagg.keystream_words(bank_retailer, round_no=1, count=16)
    other_pair = secagg.keystream_words(bank_shop, round_no=0, count=16)
    assert not np.array_equal(r0, r1)
    assert not np.array_equal(r0, other_pair)
    assert not set(r0.tolist()) & set(r1.tolist())
    assert not set(r0.tolist()) & set(other_pair.tolist())
    x = secagg.encode_update(np.ones(15), weight=3, clients=3)
    y0 = secagg.mask_update(x, me="retailer", seeds=seeds["retailer"], round_no=0)
    y1 = secagg.mask_update(x, me="retailer", seeds=seeds["retailer"], round_no=1)
    assert not np.array_equal(y0, y1)


def blocks(stream: bytes) -> set[bytes]:
    return {stream[k : k + 16] for k in range(0, len(stream), 16)}


@pytest.mark.parametrize("round_no", [0, 1, 41, 2**32 - 1, 2**64 - 2])
def test_h3_no_keystream_block_reappears_next_round(round_no: int) -> None:
    seed = fixed_seeds(IDS)["bank"]["shop"]

    def spec_blocks(r: int) -> set[bytes]:
        words = secagg.keystream_words(seed, round_no=r, count=128)  # 64 blocks
        return blocks(words.astype("<u8").tobytes())

    this, following = spec_blocks(round_no), spec_blocks(round_no + 1)
    assert len(this) == len(following) == 64
    assert not this & following


def test_h3_block_check_detects_a_counter_holding_only_the_round() -> None:
    """The flawed rule §7.1 warns about: the same check must catch it."""
    seed = fixed_seeds(IDS)["bank"]["shop"]

    def flawed(r: int) -> set[bytes]:
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(r.to_bytes(16, "big"))).encryptor()
        return blocks(encryptor.update(bytes(1024)) + encryptor.finalize())

    assert flawed(3) & flawed(4)


def test_keystream_matches_the_specified_counter_block() -> None:
    seed = bytes(range(100, 132))
    for round_no in (0, 1, 9, 2**63 + 5, 2**64 - 1):
        nonce = round_no.to_bytes(8, "big") + bytes(8)
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()
        stream = encryptor.update(bytes(32)) + encryptor.finalize()
        expected = [int.from_bytes(stream[k : k + 8], "little") for k in range(0, 32, 8)]
        words = secagg.keystream_words(seed, round_no=round_no, count=4)
        assert words.dtype == np.uint64
        assert words.tolist() == expected
    assert secagg.keystream_words(seed, round_no=0, count=0).shape == (0,)


@pytest.mark.parametrize("round_no", [-1, 2**64])
def test_keystream_refuses_rounds_outside_64_bits(round_no: int) -> None:
    with pytest.raises(ConfigError, match="round number"):
        secagg.keystream_words(bytes(32), round_no=round_no, count=1)


def test_keystream_refuses_a_short_seed() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        secagg.keystream_words(bytes(16), round_no=0, count=1)


def test_key_statement_is_length_prefixed() -> None:
    public = bytes(range(32))
    statement = secagg.key_statement(job_id="j", run_id="r1", party_id="bank", public=public)
    assert statement == (
        b"secagg-v1-key"
        + b"\x00\x00\x00\x01j"
        + b"\x00\x00\x00\x02r1"
        + b"\x00\x00\x00\x04bank"
        + b"\x00\x00\x00\x20"
        + public
    )
    shifted = secagg.key_statement(job_id="jr", run_id="1", party_id="bank", public=public)
    assert shifted != statement


def _signed(identities: dict[str, TlsIdentity], signer: str, claimed: str) -> tuple[bytes, bytes]:
    _, public = secagg.new_keypair()
    signature = secagg.sign_key(
        key_pem=identities[signer].key_pem, job_id=JOB, run_id=RUN, party_id=claimed, public=public
    )
    return public, signature


def test_h3_a_correctly_signed_key_passes(identities: dict[str, TlsIdentity]) -> None:
    public, signature = _signed(identities, "bank", "bank")
    secagg.verify_key(
        certificate_pem=identities["bank"].certificate_pem,
        job_id=JOB,
        run_id=RUN,
        party_id="bank",
        public=public,
        signature=signature,
    )


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "case",
    [
        "tampered public key",
        "tampered signature",
        "truncated signature",
        "signed by another party's key",
        "certificate of another party",
        "other run",
        "other job",
        "short public key",
    ],
)
def test_h3_a_key_without_a_valid_signature_is_refused(
    case: str, identities: dict[str, TlsIdentity]
) -> None:
    signer = "retailer" if case == "signed by another party's key" else "bank"
    public, signature = _signed(identities, signer, "bank")
    kwargs = {
        "certificate_pem": identities["bank"].certificate_pem,
        "job_id": JOB,
        "run_id": RUN,
        "party_id": "bank",
        "public": public,
        "signature": signature,
    }
    if case == "tampered public key":
        kwargs["public"] = _flip(public, 5)
    elif case == "tampered signature":
        kwargs["signature"] = _flip(signature, len(signature) - 3)
    elif case == "truncated signature":
        kwargs["signature"] = signature[:-4]
    elif case == "certificate of another party":
        kwargs["certificate_pem"] = identities["retailer"].certificate_pem
    elif case == "other run":
        kwargs["run_id"] = "run-2"
    elif case == "other job":
        kwargs["job_id"] = "job-other"
    elif case == "short public key":
        kwargs["public"] = public[:31]
    with pytest.raises(SecAggError, match="'bank'"):
        secagg.verify_key(**kwargs)  # type: ignore[arg-type]


def test_sign_key_refuses_a_non_pem_key() -> None:
    with pytest.raises(ConfigError, match="PEM"):
        secagg.sign_key(
            key_pem=b"not a key", job_id=JOB, run_id=RUN, party_id="bank", public=bytes(32)
        )


# ---------------------------------------------------------------------------
# H5: the overflow guard


def _floats_around(bound: Fraction) -> tuple[float, float]:
    """The smallest float >= bound and the largest float < bound."""
    near = float(bound)
    at = near if Fraction(near) >= bound else float(np.nextafter(near, np.inf))
    below = float(np.nextafter(at, 0.0))
    assert Fraction(below) < bound <= Fraction(at)
    return at, below


@pytest.mark.parametrize("m", [2, 3, 4, 7])
@pytest.mark.parametrize("weight", [1, 8])
@pytest.mark.parametrize("sign", [1, -1])
def test_h5_guard_at_and_just_below_the_bound(m: int, weight: int, sign: int) -> None:
    f = secagg.F_H
    at, below = _floats_around(Fraction(2**63, m))  # bound on |n·w|·2^f
    # values such that weight·value·2^f is exactly `at` / `below` (powers of two scale exactly)
    value_at, value_below = sign * at / weight / 2**f, sign * below / weight / 2**f
    assert Fraction(value_at) * weight * 2**f == sign * Fraction(at)
    ok = secagg.encode_update(np.array([0.5, value_below]), weight=weight, clients=m)
    assert int(ok.view(np.int64)[1]) == sign * int(below)
    with pytest.raises(UpdateOverflowError, match=r"coordinate 1 .*2\^63/" + str(m)):
        secagg.encode_update(np.array([0.5, value_at, 0.0]), weight=weight, clients=m)


def test_h5_guard_message_says_what_to_do() -> None:
    with pytest.raises(UpdateOverflowError) as caught:
        secagg.encode_update(np.array([0.0, 0.0, 1e30]), weight=2, clients=2)
    message = str(caught.value)
    assert "coordinate 2" in message
    assert "learning rate" in message and "fractional bits" in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_h5_guard_on_the_weight(m: int) -> None:
    first_bad = -(-(2**63) // m)  # ceil(2^63 / m)
    x = secagg.encode_update(np.zeros(2), weight=first_bad - 1, clients=m)
    assert int(x[-1]) == first_bad - 1
    with pytest.raises(UpdateOverflowError, match="sample count"):
        secagg.encode_update(np.zeros(2), weight=first_bad, clients=m)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_h5_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(UpdateOverflowError, match="coordinate 2 .*NaN or infinite"):
        secagg.encode_update(np.array([0.0, 1.0, bad, 0.0]), weight=1, clients=2)


def test_h5_negative_weight_is_refused() -> None:
    with pytest.raises(UpdateOverflowError, match=">= 0"):
        secagg.encode_update(np.zeros(3), weight=-1, clients=2)


def test_h5_product_overflowing_float_is_refused() -> None:
    with pytest.raises(UpdateOverflowError, match="coordinate 0"):
        secagg.encode_update(np.array([1e300]), weight=2**40, clients=2)


def test_encode_is_twos_complement_with_a_weight_word() -> None:
    x = secagg.encode_update(np.array([1.0, -0.5, 2.0**-21]), weight=3, clients=2)
    assert x.dtype == np.uint64 and x.shape == (4,)
    assert x.view(np.int64).tolist() == [3 * 2**20, -3 * 2**19, 2, 3]  # rint(1.5) == 2


# ---------------------------------------------------------------------------
# argument and consistency checks


def test_client_order_sorts_and_refuses_duplicates() -> None:
    assert secagg.client_order(["shop", "bank", "retailer"]) == ("bank", "retailer", "shop")
    with pytest.raises(ConfigError, match="appear twice"):
        secagg.client_order(["bank", "shop", "bank"])
    with pytest.raises(ConfigError, match="party id"):
        secagg.client_order(["bank", "Shop|x"])


def test_pairwise_seeds_refuse_bad_public_keys() -> None:
    own = fixed_key(1)
    with pytest.raises(SecAggError, match="'shop'.*32 raw"):
        secagg.pairwise_seeds(me="bank", own=own, peers={"shop": bytes(31)}, job_id=JOB)
    with pytest.raises(SecAggError, match="'shop'.*low-order"):
        secagg.pairwise_seeds(me="bank", own=own, peers={"shop": bytes(32)}, job_id=JOB)
    twin = raw_public(fixed_key(2))
    with pytest.raises(SecAggError, match="same public key"):
        secagg.pairwise_seeds(
            me="bank", own=own, peers={"shop": twin, "retailer": twin}, job_id=JOB
        )
    with pytest.raises(SecAggError, match="same public key"):
        secagg.pairwise_seeds(me="bank", own=own, peers={"shop": raw_public(own)}, job_id=JOB)
    with pytest.raises(SecAggError, match="not its own"):
        secagg.pairwise_seeds(me="bank", own=own, peers={"bank": twin}, job_id=JOB)
    with pytest.raises(ConfigError, match="job_id"):
        secagg.pairwise_seeds(me="bank", own=own, peers={"shop": twin}, job_id="")


def test_sum_updates_refuses_inconsistent_updates() -> None:
    a = np.zeros(3, dtype=np.uint64)
    with pytest.raises(SecAggError, match="update 1 has 4 words"):
        secagg.sum_updates([a, np.zeros(4, dtype=np.uint64)])
    with pytest.raises(SecAggError, match="uint64"):
        secagg.sum_updates([a, np.zeros(3, dtype=np.int64)])
    with pytest.raises(SecAggError, match="no updates"):
        secagg.sum_updates([])


def test_sum_wraps_around() -> None:
    top = np.array([2**64 - 1, 5], dtype=np.uint64)
    assert secagg.sum_updates([top, top]).tolist() == [2**64 - 2, 10]


def test_decode_refuses_a_non_positive_sample_count() -> None:
    zero = secagg.encode_update(np.ones(2), weight=0, clients=2)
    with pytest.raises(SecAggError, match="sample count is 0"):
        secagg.decode_sum(secagg.sum_updates([zero, zero]))
    negative = np.array([0, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(SecAggError, match="mask was not removed"):
        secagg.decode_sum(negative)


def test_encode_refuses_a_matrix() -> None:
    with pytest.raises(ConfigError, match="1-D"):
        secagg.encode_update(np.zeros((2, 2)), weight=1, clients=2)
