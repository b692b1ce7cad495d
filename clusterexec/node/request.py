"""What a client asks for when it opens a session: the SESSION message, read and checked.

The request is a small JSON object; its out-of-band buffers, if any, are the pickled
initializer (``initializer, initargs``), which the node forwards to each worker unopened.
"""

from __future__ import annotations

from clusterexec.errors import ProtocolError
from clusterexec.wire.compression import codec_available
from clusterexec.wire.frames import ChunkedBuffer, Message
from clusterexec.wire.messages import INIT, unpack_json


class SessionRequest:
    """A session's terms: its worker count (within the node's share), the tasks a worker runs
    before it is replaced (0: no limit), the heartbeat interval, whether workers' output goes
    to the client, the codec for results (only one this node has: WELCOME tells the client),
    and the INIT message for each worker, if the client has an initializer.

    A plain class, not a dataclass: the node imports this module at start, where a dataclass
    decorator would cost more than the whole class."""

    __slots__ = ("workers", "max_tasks_per_child", "heartbeat_interval", "output", "compression", "init")

    def __init__(
        self,
        workers: int = 0,
        max_tasks_per_child: int = 0,
        heartbeat_interval: float = 1.0,
        output: bool = False,
        compression: str | None = None,
        init: Message | None = None,
    ) -> None:
        self.workers = workers
        self.max_tasks_per_child = max_tasks_per_child
        self.heartbeat_interval = heartbeat_interval
        self.output = output
        self.compression = compression
        self.init = init

    @classmethod
    def parse(cls, message: Message, max_workers: int) -> SessionRequest:
        """Read a SESSION message; at most ``max_workers`` workers. Raises ProtocolError."""
        request = unpack_json(message.body)
        wanted = request.get("workers") or max_workers
        if not isinstance(wanted, int) or wanted < 1:
            raise ProtocolError(f"bad worker count {wanted!r} in the session request")
        max_tasks = request.get("max_tasks_per_child") or 0
        interval = request.get("heartbeat_interval", 1.0)
        codec = request.get("compression")
        init = None
        if message.buffers:
            first = message.buffers[0]
            body = first.tobytes() if isinstance(first, ChunkedBuffer) else memoryview(first)
            init = Message(INIT, body, list(message.buffers[1:]))
        return cls(
            workers=min(wanted, max_workers),
            max_tasks_per_child=max_tasks if isinstance(max_tasks, int) else 0,
            heartbeat_interval=float(interval) if isinstance(interval, (int, float)) else 1.0,
            output=request.get("output") is True,
            compression=codec if isinstance(codec, str) and codec_available(codec) else None,
            init=init,
        )
