"""End to end on real data over the in-memory channel: PSI alignment, tables, preprocessing,
encrypted split training (P1, test key) through the arbiter; the loss goes down."""

from __future__ import annotations

import os
import secrets
import threading
from typing import Any

import numpy as np

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.executor import InlineExecutor
from protocols.tags import TagRegistry
from protocols.transport.base import MessageFilter
from protocols.transport.inmemory import InMemoryNetwork
from psi.canon import IdType, prepare_ids
from psi.protocol import PsiTag, run_guest, run_host
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.splitnn_setup import split_layers
from vfl.data.datasets import data_dir, verify
from vfl.data.tables import (
    BatchOrder,
    ImputePolicy,
    Preprocessor,
    TableSpec,
    load_table,
    split_rows,
)
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode
from vfl.splitnn.training import GuestTrainer, HostTrainer, TrainConfig


def test_encrypted_training_on_breast_data_learns(pk: PublicKey, sk: PrivateKey) -> None:
    folder = data_dir(os.environ)
    guest_table = load_table(
        TableSpec(path=verify("breast_hetero_guest.csv", folder=folder).path, label_column="y")
    )
    host_table = load_table(TableSpec(path=verify("breast_hetero_host.csv", folder=folder).path))
    net = InMemoryNetwork()
    ch = {
        p.party_id: net.channel(p, tags=TagRegistry([SplitTag, DecTag, PsiTag]))
        for p in (BANK, RETAILER, ARBITER)
    }
    executor = InlineExecutor()

    # alignment by PSI (the host's file is in another row order than the guest's)
    box: dict[str, Any] = {}
    host_ids = prepare_ids(list(host_table.ids[::-1]), id_type=IdType.GENERIC)
    t = threading.Thread(
        target=lambda: box.update(
            h=run_host(
                channel=ch["retailer"],
                hello_envelope=ch["retailer"].recv_any(
                    MessageFilter.for_tags(PsiTag.HELLO), timeout=30
                ),
                ids=host_ids,
                executor=executor,
            )
        )
    )
    t.start()
    g_psi = run_guest(
        channel=ch["bank"],
        host=RETAILER,
        job_id="align",
        ids=prepare_ids(list(guest_table.ids), id_type=IdType.GENERIC),
        executor=executor,
    )
    t.join(30)
    guest = guest_table.take(g_psi.rows)  # type: ignore[arg-type]
    host = host_table.take(len(host_table) - 1 - box["h"].rows)  # the host's rows were reversed
    assert (guest.ids == host.ids).all() and len(guest) == 569

    assert guest.labels is not None
    splits = split_rows(guest.labels, test_fraction=0.2, validation_fraction=0.1, seed=0)
    x_g = Preprocessor.fit(guest, splits.train, impute=ImputePolicy.ERROR).transform(guest)
    x_h = Preprocessor.fit(host, splits.train, impute=ImputePolicy.ERROR).transform(host)

    config = TrainConfig(
        d=4,
        k=4,
        guest_widths=(8, 4),
        host_widths=(8, 4),
        learning_rate=0.02,
        protect=ProtectConfig(mode=ProtectMode.MAX_NORM),
    )
    spec = JobSpec(
        job_id="train",
        key_id=pk.key_id.hex(),
        key_bits=pk.bits,
        mode=SplitMode.P1,
        batch=32,
        d=4,
        k=4,
        batch_eval=32,
        guest="bank",
        host="retailer",
    )
    guest_layer, host_layer, _ = split_layers(ch, spec, pk, sk, executor=executor)
    g = GuestTrainer(layer=guest_layer, x=x_g, y=guest.labels, config=config)
    h = HostTrainer(layer=host_layer, x=x_h, config=config)
    rng = np.random.default_rng(0)
    w0_g, w0_h = rng.normal(0, 0.35, (4, 4)), rng.normal(0, 0.35, (4, 4))
    batches = [
        b
        for epoch in range(3)
        for b in BatchOrder(secrets.token_bytes(32), batch_size=32).epoch(splits.train, epoch)
    ]

    def host_loop() -> None:
        h.init(w0_h)
        for step in range(len(batches)):
            h.step(step)

    t = threading.Thread(target=host_loop)
    t.start()
    g.init(w0_g)
    for step, rows in enumerate(batches):
        g.step(step, rows)
    t.join(120)
    first, last = np.mean(g.losses[:6]), np.mean(g.losses[-6:])
    assert last < 0.6 * first, (first, last)
    for c in ch.values():
        c.close()
