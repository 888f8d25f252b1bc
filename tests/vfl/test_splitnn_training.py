"""End to end on real data over in-memory channels: PSI alignment, then a split-NN job
(preprocessing fitted on training rows, P1 with the test key, validation, test); it learns."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.executor import InlineExecutor
from protocols.tags import TagRegistry
from protocols.transport.base import MessageFilter
from protocols.transport.inmemory import InMemoryNetwork
from psi.canon import IdType, prepare_ids
from psi.protocol import PsiTag, run_guest, run_host
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.session_setup import run_job, trio
from vfl.data.datasets import data_dir, verify
from vfl.data.tables import TableSpec, load_table, split_rows
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.job import SplitJob
from vfl.splitnn.training import TrainConfig


def test_encrypted_training_on_breast_data_learns(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    folder = data_dir(os.environ)
    guest_table = load_table(
        TableSpec(path=verify("breast_hetero_guest.csv", folder=folder).path, label_column="y")
    )
    host_table = load_table(TableSpec(path=verify("breast_hetero_host.csv", folder=folder).path))
    net = InMemoryNetwork()
    ch = {p.party_id: net.channel(p, tags=TagRegistry([PsiTag])) for p in (BANK, RETAILER, ARBITER)}
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
    config = TrainConfig(
        d=4,
        k=4,
        guest_widths=(8, 4),
        host_widths=(8, 4),
        learning_rate=0.02,
        protect=ProtectConfig(mode=ProtectMode.MARVELL),
    )
    job = SplitJob(job_id="train", train=config, batch=32, batch_eval=64, epochs=3)
    out = run_job(trio(tmp_path, pk, sk), job, guest, host, splits)
    assert not out.errors, out.errors
    assert out.result is not None and out.guest is not None
    train_loss = [m["train_loss"] for m in out.result.history]  # mean per epoch
    assert train_loss[-1] < 0.8 * train_loss[0], train_loss
    assert out.result.test["roc_auc"] > 0.9  # breast cancer data separate well
    for c in ch.values():
        c.close()
