"""Pairwise-mask secure aggregation for horizontal FedAvg (docs/protocol.md §7.1).

The pure cryptographic layer of the Bonawitz et al. cross-silo variant: key signing
and verification, seed derivation, fixed-point encoding with the overflow guard,
masking, summing and decoding. Messages, rounds and aborts live in the protocol on
top of it; this module never touches a channel.

Roles
-----
* Clients ``P_1..P_m`` (G and H parties with the same model), indexed by
  :func:`client_order`: ``P_i`` is the ``i``-th party id in sorted order.
* Aggregator ``A`` (the arbiter): relays public keys, sums masked updates.

Keys
----
* Each client holds a long-term identity key: its TLS key (ECDSA P-256), with the
  certificate naming it pinned by every peer.
* Each client draws an ephemeral X25519 key per job (:func:`new_keypair`); only
  its public half leaves the silo, signed with the identity key.
* Clients ``i < j`` share the pairwise seed ``K_ij``; with two clients they may
  also share a group seed ``K_group``. ``A`` holds no secret key.

What each party learns
----------------------
* ``A``: the masked updates ``y_i``, each uniform in ``Z_{2^64}^{P+1}`` on its
  own, and their sum ``Σ_i x_i``, hence the weighted average and ``Σ n_i``. With
  the group mask (S7) ``A`` sees only ``Σ_i x_i + M_r``, uniform to it: nothing.
* A client: the average and ``Σ n_i``. With ``m = 2`` that reveals the other
  client's update (its own is known); only DP protects the silos from each other
  (§7.2).

Steps
-----
S1 key signing: client ``i`` draws ``(sk_i, pk_i)`` and signs
   :func:`key_statement` ``(job_id, run_id, party_id, pk_i)`` with its identity
   key (:func:`sign_key`); ``A`` relays ``(pk_i, signature)`` to every client.
S2 verification and seed derivation: each client verifies every peer's signature
   against that peer's pinned certificate *before* deriving anything
   (:func:`verify_key`; a failure aborts the job, since ``A`` may have substituted
   a key), then ``K_ij = HKDF-SHA256(ikm = X25519(sk_i, pk_j), salt = job_id,
   info = "secagg-v1|a|b")`` with ``a < b`` the two party ids
   (:func:`pairwise_seeds`).
S3 per-round masks: ``m_ij^{(r)}`` = the first ``8(P+1)`` bytes of the AES-256-CTR
   keystream under ``K_ij`` with initial counter block ``I2OSP(r, 8) ‖ 0^{64}``,
   read as little-endian ``uint64`` (:func:`keystream_words`). The round lives in
   the high 64 bits so no keystream block of round ``r`` recurs in round ``r+1``.
S4 encode and overflow guard: ``x_i = (rint(n_i w_i 2^{f_h}), n_i) mod 2^64``,
   refused unless ``|n_i w_i| 2^{f_h} < 2^63/m`` per coordinate and
   ``n_i < 2^63/m`` (:func:`encode_update`), so the sum over ``m`` clients cannot
   overflow the signed lift.
S5 masking: ``y_i = x_i + Σ_{j>i} m_ij − Σ_{j<i} m_ji (mod 2^64)``
   (:func:`mask_update`); client ``i`` sends ``y_i`` to ``A``.
S6 sum and decode: ``A`` computes ``Σ_i y_i = Σ_i x_i (mod 2^64)``
   (:func:`sum_updates`) — the pairwise masks cancel — lifts it to signed integers
   and divides: ``w̄ = Σ n_i w_i / Σ n_i`` (:func:`decode_sum`).
S7 optional group mask: the lowest-ordered participant also adds
   ``M_r = keystream(K_group, r)`` (S3's counter rule) in S5; ``A`` sums as in S6
   and broadcasts the still-masked total; clients remove ``M_r``
   (:func:`remove_group_mask`) and decode themselves. With two clients
   ``K_group`` is a separate HKDF output of the pairwise secret
   (:func:`group_seed_for_two`).

Dropouts are not handled here: cross-silo, a missing client aborts the round.
Nothing in this module logs values, seeds or keys.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.errors import (
    ConfigError,
    PeerIdentityError,
    SecAggError,
    UpdateOverflowError,
)
from protocols.roles import check_party_id
from protocols.transport.tls import party_of

__all__ = [
    "F_H",
    "RING",
    "client_order",
    "decode_sum",
    "encode_update",
    "group_seed_for_two",
    "key_statement",
    "keystream_words",
    "mask_update",
    "new_keypair",
    "pairwise_seeds",
    "remove_group_mask",
    "sign_key",
    "sum_updates",
    "verify_key",
]

F_H = 20
"""Fixed-point bits of the weighted updates ``n_i w_i`` (§9 ``f_h``)."""

RING = 2**64
"""Modulus of the masking arithmetic (numpy ``uint64`` wrap-around)."""

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
_KEY_DOMAIN = b"secagg-v1-key"
_PAIR_INFO = "secagg-v1"
_GROUP_INFO = "secagg-v1-group"
_HALF = 2**63


# ---------------------------------------------------------------------------
# S1, S2: keys, signatures, seeds


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """Draw a fresh ephemeral X25519 key (S1).

    Returns
    -------
    tuple of (X25519PrivateKey, bytes)
        The private key, kept in the silo, and its 32-byte raw public key.
    """
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def key_statement(*, job_id: str, run_id: str, party_id: str, public: bytes) -> bytes:
    """The bytes a client signs for its ephemeral public key (S1).

    ``b"secagg-v1-key"`` followed by ``job_id``, ``run_id``, ``party_id`` (UTF-8)
    and ``public``, each prefixed by its length as 4 bytes big-endian, so no two
    different tuples give the same bytes.

    Parameters
    ----------
    job_id, run_id : str
        The job and run the key is for; a signature never carries over to another.
    party_id : str
        The client announcing the key.
    public : bytes
        Its 32-byte X25519 public key.

    Returns
    -------
    bytes
        The statement.
    """
    out = bytearray(_KEY_DOMAIN)
    for field in (job_id.encode("utf-8"), run_id.encode("utf-8"), party_id.encode("utf-8")):
        out += _length_prefixed(field)
    out += _length_prefixed(bytes(public))
    return bytes(out)


def sign_key(*, key_pem: bytes, job_id: str, run_id: str, party_id: str, public: bytes) -> bytes:
    """Sign an ephemeral public key with the client's identity key (S1).

    Parameters
    ----------
    key_pem : bytes
        The client's TLS private key (ECDSA P-256, unencrypted PEM).
    job_id, run_id, party_id : str
        As in :func:`key_statement`; ``party_id`` is the signer.
    public : bytes
        The 32-byte X25519 public key to announce.

    Returns
    -------
    bytes
        A DER-encoded ECDSA-SHA256 signature over :func:`key_statement`.

    Raises
    ------
    ConfigError
        If the key is not an unencrypted P-256 PEM key or ``public`` is not 32 bytes.
    """
    _check_public(public, party_id=party_id, error=ConfigError)
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"secure aggregation: the identity key of {party_id!r} is not an unencrypted PEM "
            "private key; pass the party's TLS key (TlsIdentity.key_pem)"
        ) from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
        private.curve, ec.SECP256R1
    ):
        raise ConfigError(
            f"secure aggregation: the identity key of {party_id!r} is not an ECDSA P-256 key; "
            "use the key made by `vfl certs`"
        )
    statement = key_statement(job_id=job_id, run_id=run_id, party_id=party_id, public=public)
    return private.sign(statement, ec.ECDSA(hashes.SHA256()))


def verify_key(
    *,
    certificate_pem: bytes,
    job_id: str,
    run_id: str,
    party_id: str,
    public: bytes,
    signature: bytes,
) -> None:
    """Check that ``party_id`` signed ``public`` for this job and run (S2).

    Call it for every peer before deriving any seed. The certificate must be the one
    pinned for ``party_id`` (already checked against the federation's CA by the
    transport); this function does not check the chain or the validity dates.

    Parameters
    ----------
    certificate_pem : bytes
        The peer's pinned certificate (PEM).
    job_id, run_id, party_id : str
        As in :func:`key_statement`; ``party_id`` is the claimed signer.
    public : bytes
        The announced 32-byte X25519 public key.
    signature : bytes
        The DER ECDSA signature relayed with it.

    Raises
    ------
    SecAggError
        Naming the party, if the certificate does not name ``party_id``, is not a P-256
        certificate, the key is not 32 bytes, or the signature does not verify. The
        caller must abort the job: the aggregator or the network altered the key.
    """
    _check_public(public, party_id=party_id, error=SecAggError)
    try:
        named = party_of(certificate_pem).party_id
    except (ConfigError, PeerIdentityError) as exc:
        raise SecAggError(
            f"secure aggregation: the certificate given for {party_id!r} is unusable ({exc}); "
            "abort and pin that party's certificate"
        ) from exc
    if named != party_id:
        raise SecAggError(
            f"secure aggregation: the certificate given for {party_id!r} names {named!r}; "
            "abort: a key must be verified with the certificate of the party that announced it"
        )
    certificate_key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    if not isinstance(certificate_key, ec.EllipticCurvePublicKey) or not isinstance(
        certificate_key.curve, ec.SECP256R1
    ):
        raise SecAggError(
            f"secure aggregation: the certificate of {party_id!r} does not hold an ECDSA "
            "P-256 key; abort and reissue it with `vfl certs`"
        )
    statement = key_statement(job_id=job_id, run_id=run_id, party_id=party_id, public=public)
    try:
        certificate_key.verify(bytes(signature), statement, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise SecAggError(
            f"secure aggregation: the public key announced for {party_id!r} (job {job_id!r}, "
            f"run {run_id!r}) does not carry a valid signature of that party; abort the job: "
            "the aggregator or the network altered it"
        ) from None


def client_order(party_ids: Iterable[str]) -> tuple[str, ...]:
    """The clients' order: sorted party ids; position ``i`` is client ``P_i``.

    Raises
    ------
    ConfigError
        If an id is not a valid party id or appears twice.
    """
    ids = [check_party_id(p, where="secure aggregation client") for p in party_ids]
    ordered = tuple(sorted(ids))
    duplicates = sorted({p for p in ordered if ids.count(p) > 1})
    if duplicates:
        raise ConfigError(
            f"secure aggregation: client ids must be distinct, {duplicates} appear twice; "
            "list each client once"
        )
    return ordered


def pairwise_seeds(
    *, me: str, own: X25519PrivateKey, peers: Mapping[str, bytes], job_id: str
) -> dict[str, bytes]:
    """Derive the pairwise seed ``K_ij`` with every other client (S2).

    ``K = HKDF-SHA256(ikm = X25519(own, pk_j), salt = job_id, info = "secagg-v1|a|b")``
    with ``a < b`` the two party ids, so both ends derive the same 32 bytes.

    Parameters
    ----------
    me : str
        This client's party id.
    own : X25519PrivateKey
        This client's ephemeral key of the job.
    peers : Mapping[str, bytes]
        Verified public keys by party id (:func:`verify_key` first). An entry for
        ``me`` is allowed if it is this client's own public key, and skipped.
    job_id : str
        The job (HKDF salt).

    Returns
    -------
    dict[str, bytes]
        Seed per other client.

    Raises
    ------
    SecAggError
        If a public key is not 32 bytes or a low-order point, two clients announced
        the same key, or the entry for ``me`` is not this client's key.
    ConfigError
        If ids are invalid or ``job_id`` is empty.
    """
    _check_job(job_id)
    mine = own.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    others = {p: bytes(k) for p, k in peers.items() if p != me}
    if me in peers and bytes(peers[me]) != mine:
        raise SecAggError(
            f"secure aggregation: the key listed for this client {me!r} is not its own; abort"
        )
    client_order([me, *others])
    seen: dict[bytes, str] = {mine: me}
    for peer, public in others.items():
        _check_public(public, party_id=peer, error=SecAggError)
        if public in seen:
            raise SecAggError(
                f"secure aggregation: {peer!r} announced the same public key as "
                f"{seen[public]!r}; abort the job"
            )
        seen[public] = peer
    return {
        peer: _derive(own, peer=peer, public=public, me=me, job_id=job_id, label=_PAIR_INFO)
        for peer, public in others.items()
    }


def group_seed_for_two(
    *, me: str, own: X25519PrivateKey, peer: str, peer_public: bytes, job_id: str
) -> bytes:
    """The group seed ``K_group`` of two clients (S7).

    A separate HKDF output of their pairwise X25519 secret (info
    ``"secagg-v1-group|a|b"``, ``a < b``), independent of ``K_ij``.

    Raises
    ------
    SecAggError
        If ``peer_public`` is not a usable key or equals this client's own.
    ConfigError
        If ids are invalid or equal, or ``job_id`` is empty.
    """
    _check_job(job_id)
    client_order([me, peer])
    _check_public(peer_public, party_id=peer, error=SecAggError)
    mine = own.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if bytes(peer_public) == mine:
        raise SecAggError(
            f"secure aggregation: {peer!r} announced this client's own public key; abort"
        )
    return _derive(
        own, peer=peer, public=bytes(peer_public), me=me, job_id=job_id, label=_GROUP_INFO
    )


# ---------------------------------------------------------------------------
# S3: masks


def keystream_words(seed: bytes, *, round_no: int, count: int) -> np.ndarray:
    """The round's mask words under one seed (S3).

    The first ``8·count`` bytes of AES-256-CTR under ``seed`` with initial counter
    block ``round_no.to_bytes(8, "big") + bytes(8)``, read as little-endian ``uint64``.

    Parameters
    ----------
    seed : bytes
        A 32-byte seed (``K_ij`` or ``K_group``).
    round_no : int
        The round, ``0 <= round_no < 2^64``.
    count : int
        Number of words, ``>= 0``.

    Returns
    -------
    numpy.ndarray
        ``uint64`` array of length ``count`` (writable, native byte order).
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(
            f"secure aggregation: a mask seed must be {SEED_BYTES} bytes, got {len(seed)}; "
            "derive it with pairwise_seeds or group_seed_for_two"
        )
    round_no = operator.index(round_no)
    count = operator.index(count)
    if not 0 <= round_no < RING:
        raise ConfigError(f"secure aggregation: round number must lie in [0, 2^64), got {round_no}")
    if count < 0:
        raise ConfigError(f"secure aggregation: word count must be >= 0, got {count}")
    # S3: round number in the high 64 bits, block counter in the low 64 bits.
    nonce = round_no.to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(nonce)).encryptor()
    stream = encryptor.update(bytes(8 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


# ---------------------------------------------------------------------------
# S4: encoding and the overflow guard


def encode_update(
    values: np.ndarray, *, weight: int, clients: int, frac_bits: int = F_H
) -> np.ndarray:
    """Encode ``weight·values`` and ``weight`` into ``Z_{2^64}`` (S4).

    ``x = rint(weight·values·2^f)`` as ``int64`` reduced to ``uint64`` (two's
    complement), followed by one word holding ``weight`` (scale 0).

    Parameters
    ----------
    values : numpy.ndarray
        The client's update ``w_i``: a 1-D array of finite real numbers, length ``P``.
    weight : int
        ``n_i``, the client's sample count, ``0 <= weight < 2^63/clients``.
    clients : int
        ``m``, the number of clients whose updates will be summed.
    frac_bits : int
        Fixed-point bits ``f``, ``0 <= f <= 62``.

    Returns
    -------
    numpy.ndarray
        ``uint64`` array of length ``P + 1``.

    Raises
    ------
    UpdateOverflowError
        The §7.1 guard: a value is not finite, ``weight`` is negative, or
        ``|weight·v|·2^f`` or ``weight`` is not below ``2^63/clients`` (after rounding
        to the integer that would be sent), so the sum could overflow. The message
        names the first coordinate at fault and the bound, never the value.
    ConfigError
        If ``values`` is not 1-D real, or ``clients`` or ``frac_bits`` is out of range.
    """
    weight = operator.index(weight)
    clients = _check_clients(clients)
    frac_bits = _check_frac_bits(frac_bits)
    array = np.asarray(values)
    if array.ndim != 1 or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ConfigError(
            "secure aggregation: the update must be a 1-D array of real numbers, got "
            f"shape {array.shape} dtype {array.dtype}; flatten the model parameters first"
        )
    if weight < 0:
        raise UpdateOverflowError(
            f"secure aggregation: the sample count (weight) must be >= 0, got {weight}"
        )
    # S4 guard on the weight, exact in Python integers: m·n_i < 2^63.
    if weight * clients >= _HALF:
        raise UpdateOverflowError(
            f"secure aggregation: the sample count (weight) must be below 2^63/{clients} = "
            f"{_HALF / clients:.6g} so the sum over {clients} clients fits; "
            "use a smaller weight (e.g. count batches, not samples)"
        )
    floats = array.astype(np.float64)
    finite = np.isfinite(floats)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(np.ldexp(floats * float(weight), frac_bits))
    # S4 guard, exact on the integers that would be sent: m·|x| < 2^63, i.e. |x| <= limit.
    # float(2^63) is exact; the comparison is false for inf and NaN.
    limit = (_HALF - 1) // clients
    in_int64 = np.abs(scaled) < float(_HALF)
    fixed = np.where(in_int64, scaled, 0.0).astype(np.int64)
    ok = finite & in_int64 & (np.abs(fixed) <= limit)
    if not ok.all():
        index = int(np.argmin(ok))
        if not finite[index]:
            raise UpdateOverflowError(
                f"secure aggregation: coordinate {index} of the update is NaN or infinite; "
                "training diverged: lower the learning rate or clip the update"
            )
        bound = _HALF / clients / 2.0**frac_bits
        raise UpdateOverflowError(
            f"secure aggregation: coordinate {index} of the weighted update (weight·value) "
            f"breaks the overflow guard |weight·value|·2^{frac_bits} < 2^63/{clients}, i.e. "
            f"|weight·value| < {bound:.6g}; lower the learning rate or clip the update, "
            "or use fewer fractional bits"
        )
    out = np.empty(array.shape[0] + 1, dtype=np.uint64)
    out[:-1] = fixed.view(np.uint64)
    out[-1] = np.uint64(weight)
    return out


# ---------------------------------------------------------------------------
# S5: masking


def mask_update(
    x: np.ndarray,
    *,
    me: str,
    seeds: Mapping[str, bytes],
    round_no: int,
    group_seed: bytes | None = None,
) -> np.ndarray:
    """Mask an encoded update for round ``round_no`` (S5, and S7 if ``group_seed``).

    ``y = x + Σ_{j>i} m_ij − Σ_{j<i} m_ji (mod 2^64)`` over the clients ``j`` in
    ``seeds``, ordered by :func:`client_order`.

    Parameters
    ----------
    x : numpy.ndarray
        The encoded update (:func:`encode_update`), 1-D ``uint64``.
    me : str
        This client's party id.
    seeds : Mapping[str, bytes]
        ``K_ij`` for every other participant of this round, and only those.
    round_no : int
        The round, ``0 <= round_no < 2^64``; never reuse one within a job.
    group_seed : bytes or None
        ``K_group``; pass it only on the lowest-ordered participant (S7).

    Returns
    -------
    numpy.ndarray
        ``y``, a new ``uint64`` array.

    Raises
    ------
    SecAggError
        If ``x`` is not 1-D ``uint64``, or ``group_seed`` is given by a client that is
        not the lowest-ordered participant.
    ConfigError
        If the participants' ids are invalid or repeated.
    """
    _check_words(x, what="the encoded update")
    order = client_order([me, *seeds])
    if group_seed is not None and order[0] != me:
        raise SecAggError(
            f"secure aggregation: only the lowest-ordered participant ({order[0]!r}) adds the "
            f"group mask, not {me!r}; pass group_seed on that client only"
        )
    y = x.copy()
    count = y.shape[0]
    for peer in order:
        if peer == me:
            continue
        mask = keystream_words(seeds[peer], round_no=round_no, count=count)
        # S5: + m_ij towards higher-ordered peers, − m_ji towards lower ones (uint64 wraps).
        if peer > me:
            y += mask
        else:
            y -= mask
    if group_seed is not None:
        # S7: the lowest-ordered participant adds M_r.
        y += keystream_words(group_seed, round_no=round_no, count=count)
    return y


# ---------------------------------------------------------------------------
# S6, S7: summing and decoding


def sum_updates(updates: Sequence[np.ndarray]) -> np.ndarray:
    """Sum masked updates modulo ``2^64`` (S6, the aggregator's step).

    Raises
    ------
    SecAggError
        If there is no update, or one is not 1-D ``uint64`` or differs in length.
    """
    if len(updates) == 0:
        raise SecAggError("secure aggregation: no updates to sum; the round must be aborted")
    first = updates[0]
    _check_words(first, what="update 0")
    total = first.copy()
    for index, update in enumerate(updates[1:], start=1):
        _check_words(update, what=f"update {index}")
        if update.shape != total.shape:
            raise SecAggError(
                f"secure aggregation: update {index} has {update.shape[0]} words, update 0 has "
                f"{total.shape[0]}; clients disagree on the model size: abort the round"
            )
        total += update
    return total


def remove_group_mask(total: np.ndarray, *, group_seed: bytes, round_no: int) -> np.ndarray:
    """Subtract the group mask ``M_r`` from the aggregator's total (S7, clients only).

    Returns
    -------
    numpy.ndarray
        ``Σ_i x_i`` as a new ``uint64`` array.
    """
    _check_words(total, what="the total")
    # S7: clients subtract M_r (uint64 wraps).
    plain: np.ndarray = total - keystream_words(group_seed, round_no=round_no, count=total.shape[0])
    return plain


def decode_sum(total: np.ndarray, *, frac_bits: int = F_H) -> tuple[np.ndarray, int]:
    """Decode ``Σ_i x_i`` into the weighted average (S6).

    The words are lifted to signed integers (``int64`` view); the first ``P`` divided
    by ``2^f`` give ``Σ n_i w_i``, the last gives ``Σ n_i``.

    Parameters
    ----------
    total : numpy.ndarray
        The unmasked sum, 1-D ``uint64`` of length ``P + 1``.
    frac_bits : int
        Fixed-point bits used by :func:`encode_update`.

    Returns
    -------
    tuple of (numpy.ndarray, int)
        ``(Σ n_i w_i / Σ n_i`` as ``float64`` of length ``P``, ``Σ n_i)``.

    Raises
    ------
    SecAggError
        If ``Σ n_i <= 0`` (no samples, or a mask was not removed).
    """
    _check_words(total, what="the total")
    frac_bits = _check_frac_bits(frac_bits)
    if total.shape[0] == 0:
        raise SecAggError("secure aggregation: the total has no weight word; abort the round")
    signed = total.view(np.int64)
    samples = int(signed[-1])
    if samples <= 0:
        raise SecAggError(
            f"secure aggregation: the summed sample count is {samples}, not positive; either "
            "no client had samples or a mask was not removed: abort the round"
        )
    weighted = np.ldexp(signed[:-1].astype(np.float64), -frac_bits)
    return weighted / float(samples), samples


# ---------------------------------------------------------------------------
# helpers


def _length_prefixed(field: bytes) -> bytes:
    if len(field) >= 2**32:
        raise ConfigError("secure aggregation: a signed field is longer than 2^32 bytes")
    return len(field).to_bytes(4, "big") + field


def _check_public(public: bytes, *, party_id: str, error: type[Exception]) -> None:
    if not isinstance(public, bytes | bytearray) or len(public) != PUBLIC_KEY_BYTES:
        size = len(public) if isinstance(public, bytes | bytearray) else type(public).__name__
        raise error(
            f"secure aggregation: the public key of {party_id!r} must be "
            f"{PUBLIC_KEY_BYTES} raw X25519 bytes, got {size}; abort the job"
        )


def _check_job(job_id: str) -> None:
    if not isinstance(job_id, str) or not job_id:
        raise ConfigError("secure aggregation: job_id must be a non-empty string")


def _check_clients(clients: int) -> int:
    clients = operator.index(clients)
    if clients < 1:
        raise ConfigError(f"secure aggregation: the number of clients must be >= 1, got {clients}")
    return clients


def _check_frac_bits(frac_bits: int) -> int:
    frac_bits = operator.index(frac_bits)
    if not 0 <= frac_bits <= 62:
        raise ConfigError(
            f"secure aggregation: fractional bits must lie in [0, 62], got {frac_bits}"
        )
    return frac_bits


def _check_words(words: np.ndarray, *, what: str) -> None:
    if not isinstance(words, np.ndarray) or words.dtype != np.uint64 or words.ndim != 1:
        shape = getattr(words, "shape", None)
        dtype = getattr(words, "dtype", type(words).__name__)
        raise SecAggError(
            f"secure aggregation: {what} must be a 1-D uint64 array, got shape {shape} "
            f"dtype {dtype}; encode it with encode_update"
        )


def _derive(
    own: X25519PrivateKey, *, peer: str, public: bytes, me: str, job_id: str, label: str
) -> bytes:
    low, high = sorted((me, peer))
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise SecAggError(
            f"secure aggregation: the public key of {peer!r} is a low-order point "
            "(the shared secret is zero); abort the job"
        ) from None
    # S2: K = HKDF-SHA256(ikm = X25519(sk_i, pk_j), salt = job_id, info = label|a|b).
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=SEED_BYTES,
        salt=job_id.encode("utf-8"),
        info=f"{label}|{low}|{high}".encode(),
    )
    return hkdf.derive(shared)
