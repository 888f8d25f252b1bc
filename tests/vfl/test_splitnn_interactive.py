"""S1/S2 for the interactive layer: encrypted runs (P0, P1) over the in-memory channel with the
real arbiter service equal the integer reference bit for bit."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.executor import InlineExecutor
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.splitnn_setup import guest_step, host_step, split_layers
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.reference import InteractiveReference
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_encrypted_steps_equal_the_integer_reference(
    mode: SplitMode, pk: PublicKey, sk: PrivateKey
) -> None:
    b, d, k, steps = 4, 3, 9, 3  # k = 9 > 7 slots of a 1024-bit key: two packed blocks in P1
    spec = JobSpec(
        job_id=f"split-{mode}",
        key_id=pk.key_id.hex(),
        key_bits=pk.bits,
        mode=mode,
        batch=b,
        d=d,
        k=k,
        batch_eval=b,
        guest="bank",
        host="retailer",
        steps_per_epoch=64,  # a schedule long enough for every test
        eval_steps=64,
    )
    net = InMemoryNetwork()
    tags = [SplitTag, DecTag]
    ch = {p.party_id: net.channel(p, tags=TagRegistry(tags)) for p in (BANK, RETAILER, ARBITER)}
    guest, host, policy = split_layers(ch, spec, pk, sk, executor=InlineExecutor())
    rng = np.random.default_rng(3)
    w0_g, w0_h = rng.normal(0, 0.5, (d, k)), rng.normal(0, 0.5, (d, k))
    alphas = [np.tanh(rng.normal(0, 1, (b, d))) for _ in range(steps)]
    deltas = [rng.normal(0, 0.05, (b, k)) for _ in range(steps)]
    host_out: list[Any] = []

    def run_host() -> None:
        host.init(w0_h)
        for t in range(steps):
            host_out.append(host_step(host, t, lambda rows, t=t: alphas[t]))

    thread = threading.Thread(target=run_host)
    thread.start()
    guest.init(w0_g)
    guest_out = [
        guest_step(guest, t, np.arange(b) + t, lambda z, t=t: deltas[t], 0.1) for t in range(steps)
    ]
    thread.join(60)

    ref = InteractiveReference(mode=mode, n=pk.n)
    shares = ref.init(w0_g, w0_h)
    for t in range(steps):
        a_hat, z = ref.forward(shares, alphas[t])
        g, shares = ref.backward(shares, a_hat, deltas[t], eta=0.1)
        assert np.array_equal(guest_out[t][0], z), f"z_h differs at step {t}"  # S1: max diff = 0
        assert np.array_equal(host_out[t][1], g), f"g_h differs at step {t}"
    assert policy.counts(spec.job_id) == {
        DecTag.Z_FWD.value: steps * b * spec.kappa_k,
        DecTag.G_BWD.value: steps * b * spec.kappa_d,
        DecTag.V_WUPD.value: steps * d * spec.kappa_k,
    }
    for c in ch.values():
        c.close()
