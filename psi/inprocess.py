"""G and H of a PSI run in one process (experiments, benchmarks, tests).

Steps 0-4 of :mod:`psi.protocol` over in-memory channels: H follows in a thread, G runs in
the caller's thread. Ids never leave the process, so this is for trying and measuring the
protocol, not for two silos (they run it between their services: ``vfl psi``).
"""

from __future__ import annotations

import threading

from protocols.executor import Executor
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.base import Channel, MessageFilter
from protocols.transport.inmemory import InMemoryNetwork
from psi.canon import PreparedIds
from psi.protocol import PsiOptions, PsiResult, PsiTag, run_guest, run_host

GUEST = Party("guest", Role.GUEST)
HOST = Party("host", Role.HOST)


def channel_pair(guest: Party = GUEST, host: Party = HOST) -> tuple[Channel, Channel]:
    """G's and H's channels on one in-memory network, accepting the PSI tags."""
    net = InMemoryNetwork()
    tags = TagRegistry([PsiTag])
    return net.channel(guest, tags=tags), net.channel(host, tags=tags)


def align_in_process(
    *,
    guest_ids: PreparedIds,
    host_ids: PreparedIds,
    guest_executor: Executor,
    host_executor: Executor | None = None,
    options: PsiOptions | None = None,
    job_id: str = "psi",
    timeout: float = 3600.0,
    channels: tuple[Channel, Channel] | None = None,
) -> tuple[PsiResult, PsiResult]:
    """Run one PSI; return G's and H's results.

    Parameters
    ----------
    guest_ids, host_ids
        Each party's prepared ids.
    guest_executor, host_executor
        Each party's workers (H shares G's when ``host_executor`` is ``None``).
    options
        G's choice of mode, padding and chunk sizes (default: :class:`PsiOptions`).
    job_id
        The run's job id.
    timeout
        Seconds H waits for ``HELLO`` and for each message.
    channels
        G's and H's channels (default: :func:`channel_pair`); both are closed at the end.
    """
    guest_channel, host_channel = channels or channel_pair()
    hosts: list[PsiResult] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            hello = host_channel.recv_any(MessageFilter.for_tags(PsiTag.HELLO), timeout=timeout)
            result = run_host(
                channel=host_channel,
                hello_envelope=hello,
                ids=host_ids,
                executor=host_executor or guest_executor,
                timeout=timeout,
            )
            hosts.append(result)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=follow, name="psi-host", daemon=True)
    thread.start()
    try:
        guest = run_guest(
            channel=guest_channel,
            host=host_channel.me,
            job_id=job_id,
            ids=guest_ids,
            executor=guest_executor,
            options=options or PsiOptions(),
        )
    finally:
        thread.join()  # H ends on its own: each of its receives has a timeout
        guest_channel.close()
        host_channel.close()
    if errors:
        raise errors[0]
    return guest, hosts[0]
