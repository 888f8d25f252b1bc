"""Every party of a job in one process: what each mode's ``run_in_process`` is built on.

Experiments, tests, benchmarks and :mod:`vfl.simulate` run a whole federation in one
process. :class:`InProcess` gives a mode's in-process entry

* one in-memory network (:mod:`protocols.transport.inmemory`: the same codec, digests and
  receive checks as gRPC; only the bytes stay in the process) with a channel per party;
* the real arbiter service (:meth:`InProcess.serve_arbiter`) with a fresh Paillier key of
  2048 bits; a smaller one only with ``allow_test_key`` (tests), as everywhere else;
* an executor for the heavy work: the caller's, or a local process pool of its own;
* a state folder with a private sub-folder per party (``<state_dir>/<party id>``): the
  caller's, or a temporary one deleted at the end;
* :meth:`InProcess.run`: each party's session on a thread of its own, errors raised in the
  caller's thread and a deadline for them all.

Data never leaves the process, so this is for trying models and measuring the protocol,
never for two silos (those run the party service, :mod:`vfl.service`).

Results follow one convention across modes (:class:`InProcessResult`): ``job_id`` and
``seconds`` (the job's wall time, key generation and setup excluded) always; ``result``, the
result of the party that submitted the job (the guest; FedAvg: the coordinator); ``host``,
what the host's session returned; ``decryptions``, what the arbiter decrypted per tag, and
``public_key``, its key (the modes with a Paillier key).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from protocols.arbiter.service import ArbiterService
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.paillier import PublicKey, generate_keypair
from protocols.crypto.policy import DecryptionPolicy, JobPolicy
from protocols.errors import ProtocolError
from protocols.executor import Executor, LocalProcessExecutor
from protocols.files import private_dir
from protocols.ids import state_path
from protocols.roles import Party
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.inmemory import InMemoryNetwork

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[InMemoryNetwork, Party, TagRegistry], Channel]
"""Builds a party's channel on the network (tests interpose on sends with one)."""


@dataclass(frozen=True)
class InProcessResult:
    """The fields every mode's in-process result has (see the module docstring)."""

    job_id: str
    seconds: float


class InProcess:
    """One job's parties, network, arbiter key, executor and state folder in this process.

    Use it as a context manager: on exit every channel is closed, an executor it made is
    shut down and a temporary state folder is deleted.

    Parameters
    ----------
    parties
        Every party of the job, the arbiter (or aggregator) included.
    tags
        The message tags the job's channels accept.
    state_dir
        Where the parties keep their state (``<state_dir>/<party id>``); default: a private
        temporary folder, deleted on exit.
    executor
        Workers for the heavy work of every party; default: a local process pool, shut down
        on exit.
    channel_factory
        Builds each party's channel (default: :meth:`InMemoryNetwork.channel`).
    """

    def __init__(
        self,
        *,
        parties: Sequence[Party],
        tags: Iterable[type[StrEnum]],
        state_dir: Path | None = None,
        executor: Executor | None = None,
        channel_factory: ChannelFactory | None = None,
    ) -> None:
        network = InMemoryNetwork()
        enums = list(tags)

        def make(party: Party) -> Channel:
            registry = TagRegistry(enums)
            if channel_factory is not None:
                return channel_factory(network, party, registry)
            return network.channel(party, tags=registry)

        self.channels = {party.party_id: make(party) for party in parties}
        self._owned_executor: Executor | None = None
        if executor is None:
            executor = self._owned_executor = LocalProcessExecutor()
        self.executor = executor
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vfl-")
            state_dir = Path(self._tmp.name)
        self.state_dir = private_dir(state_dir)
        self._closed = False
        self._close_lock = threading.Lock()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_channels()
        if self._owned_executor is not None:
            self._owned_executor.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def state(self, party_id: str) -> Path:
        """The party's own state folder, ``<state_dir>/<party id>`` (0700)."""
        return private_dir(state_path(self.state_dir, party_id))

    def serve_arbiter(
        self,
        *,
        party_id: str,
        tags: Iterable[type[StrEnum]],
        policy_of: Callable[[dict[str, Any]], JobPolicy],
        key_bits: int = 2048,
        allow_test_key: bool = False,
        policy: DecryptionPolicy | None = None,
    ) -> tuple[ArbiterService, PublicKey]:
        """The arbiter's service on ``party_id``'s channel with a fresh Paillier key, and
        that key's public part.

        It answers the setup messages (``SetupTag``: key, JOB_SPEC with the policy
        ``policy_of`` derives from it, RESUME, JOB_DONE) and masked decryptions of ``tags``
        under ``policy`` (default: a new one in memory). Keys below 2048 bits need
        ``allow_test_key`` (tests only; logged as insecure).
        """
        public, private = generate_keypair(bits=key_bits, allow_test_key=allow_test_key)
        service = ArbiterService(
            channel=self.channels[party_id],
            cipher=PaillierCipher(public),
            private_key=private,
            policy=policy or DecryptionPolicy(),
            executor=self.executor,
        )
        for enum_cls in tags:
            service.serve(enum_cls)
        service.serve_setup(policy_of)
        return service, public

    def run(
        self,
        tasks: Mapping[str, Callable[[], object]],
        *,
        timeout: float,
        close_on_failure: bool = True,
    ) -> dict[str, object]:
        """Run each party's task on its own thread; return their outputs by name.

        The first task to fail has its error raised here once every task ended (the others
        usually fail because of it). With ``close_on_failure`` its failure closes every
        channel at once, so the others stop waiting for messages that will never come; a
        protocol that tells every party itself (FedAvg's ``ABORT``, F7) turns it off.
        A task still running after ``timeout`` seconds is an error too.
        """
        outputs: dict[str, object] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def body(name: str, task: Callable[[], object]) -> None:
            try:
                out = task()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                with lock:
                    errors.append(exc)
                if close_on_failure:
                    self.close_channels()
                return
            with lock:
                outputs[name] = out

        threads = [
            threading.Thread(target=body, args=(name, task), name=f"vfl-{name}", daemon=True)
            for name, task in tasks.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        late = [thread.name.removeprefix("vfl-") for thread in threads if thread.is_alive()]
        if late:
            with lock:
                before = list(errors)  # closing the channels makes the late ones fail too
            self.close_channels()  # their receives end at once
            for thread in threads:
                thread.join(10.0)
            if before:
                raise before[0]
            raise ProtocolError(f"{', '.join(late)} still running after {timeout:g} s")
        if errors:
            raise errors[0]
        return outputs

    def close_channels(self) -> None:
        """Close every party's channel (their waiting receives raise at once); idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for channel in self.channels.values():
            channel.close()
