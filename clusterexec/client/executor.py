"""``ClusterExecutor``: the ``concurrent.futures.Executor`` API over clusterexec nodes.

It behaves as ``ProcessPoolExecutor``, to the detail: ``submit``, ``map`` (with ``chunksize``,
``timeout`` and ``buffersize``), ``shutdown(wait, cancel_futures)``, the context manager, and the
same errors. Pickling happens in the calling thread; the scheduler's I/O thread does the rest.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from clusterexec.client.link import NodeLink, SessionRequest, no_node_error
from clusterexec.client.mapping import map_tasks
from clusterexec.client.output import OutputPrinter, PrefixChoice, resolve_prefix
from clusterexec.client.report import ClusterReport, ClusterStats, NodeReport, NodeStatus
from clusterexec.client.scheduler import Scheduler
from clusterexec.client.tasks import UNSEEN, Task, TaskFuture
from clusterexec.code.mainscript import prepare_worker
from clusterexec.code.serialize import FunctionPayload, Payload, dumps, dumps_call, pickle_function
from clusterexec.code.shipping import ModuleCatalog, rerunning_main
from clusterexec.errors import BrokenCluster, ConfigurationError
from clusterexec.keys import resolve_key
from clusterexec.launch.local import LocalNode
from clusterexec.launch.specs import (
    ALL_GROUP,
    DEFAULT_PORT,
    NodeAddress,
    SshSpec,
    cluster_from_env,
    parse_address,
    read_cluster_file,
    resolve_nodes,
)
from clusterexec.wire.compression import check_codec
from clusterexec.wire.messages import WORKERS_KILL, WORKERS_TERMINATE

T = TypeVar("T")

_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()
_global_shutdown = False
_global_lock = threading.Lock()


def _python_exit() -> None:
    """At interpreter exit, let every executor finish its pending work, as PPE does."""
    global _global_shutdown
    with _global_lock:
        _global_shutdown = True
    schedulers = list(_live)
    for scheduler in schedulers:
        scheduler.stop()
    for scheduler in schedulers:
        scheduler.join()
    unseen = UNSEEN.report()
    if unseen is not None:
        sys.stderr.write(unseen + "\n")


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Python without the private hook
    import atexit

    atexit.register(_python_exit)


def _stop_scheduler(scheduler: Scheduler) -> None:
    scheduler.stop()


class ClusterExecutor(Executor):
    """An Executor that runs calls on clusterexec worker nodes.

    ``nodes`` is None (start local nodes), an int (that many local workers, like
    ``ProcessPoolExecutor(4)``), one address or a list of addresses (``"host:port"``,
    ``"[ipv6]:port"``, ``(host, port)``). ``max_workers`` is the number of local workers, or for
    remote nodes the number of workers asked of the cluster (spread over the nodes).

    The constructor blocks until every node has been tried once (at most ``connect_timeout``)
    and raises if none can be used: :class:`~clusterexec.AuthenticationError` for a wrong key,
    :class:`~clusterexec.NodeUnreachableError` otherwise. Nodes that fail while others work are
    retried in the background. All methods are thread-safe.

    ``compression`` ("zlib", "bz2" or "lzma"; None, the default, for none) compresses large
    arguments, functions, shipped modules and results end to end between this process and the
    workers, where it shrinks them; an SSH spec's ``compress=`` option overrides it per node.

    What tasks print reaches this process's stdout and stderr (``forward_output``), line by
    line, each line prefixed by ``output_prefix`` (``{node}`` and ``{pid}`` are filled in; None
    for no prefix). By default the local default prints no prefix, exactly as
    ``ProcessPoolExecutor``, and named nodes print ``[host:port] ``.
    """

    def __init__(
        self,
        nodes: Any = None,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        key: str | bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        retries: int = 3,
        connect_timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        reconnect_window: float = 30.0,
        modules: Iterable[types.ModuleType | str] = (),
        auto_modules: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        forward_output: bool = True,
        output_prefix: str | None | PrefixChoice = PrefixChoice.BY_NODES,
        mp_context: object = None,
        compression: str | None = None,
    ) -> None:
        if rerunning_main():
            raise RuntimeError(
                "a ClusterExecutor was created while a worker re-ran the main script to find the task "
                "functions defined in it; put the code that creates the executor under "
                '`if __name__ == "__main__":`, as with multiprocessing\'s spawn'
            )
        if isinstance(nodes, int) and not isinstance(nodes, bool):
            if max_workers is not None:
                raise TypeError("pass max_workers either as the first argument or by name, not both")
            nodes, max_workers = None, nodes
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self._compression = check_codec(compression)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._functions: weakref.WeakKeyDictionary[Callable[..., Any], FunctionPayload] = weakref.WeakKeyDictionary()
        self._closers: list[Callable[[], None]] = []
        self._catalog = ModuleCatalog(list(modules), auto=auto_modules)
        preload = self._catalog.explicit
        # Every worker first takes the client's sys.argv, as a fork does, then runs the initializer.
        payload = dumps((prepare_worker, (list(sys.argv), initializer, tuple(initargs))), self._catalog)
        init = (payload.body, payload.buffers)
        preload = preload + payload.modules
        request = SessionRequest(None, max_tasks_per_child, heartbeat_interval, init, output=forward_output)
        cluster = cluster_from_env()
        if nodes is None and cluster:
            # $CLUSTER names no group, so it means the whole cluster: every host (PEAK's `hosts`).
            nodes = read_cluster_file(cluster, ALL_GROUP)
        if nodes is None:
            self._max_workers = max_workers or os.cpu_count() or 1
            local = LocalNode(self._max_workers)
            self._closers.append(local.stop)
            links = [
                NodeLink(
                    local.address, local.key, request, self._max_workers, connect_timeout, compression=self._compression
                )
            ]
        else:
            links = self._remote_links(resolve_nodes(nodes), key, key_file, max_workers, request, connect_timeout)
            for link in links:
                if ssl_context is not None and not link.name.startswith("ssh://"):
                    link.tls = ssl_context
            self._max_workers = max_workers or 0
        self._scheduler = Scheduler(
            links,
            retries=retries,
            heartbeat_timeout=heartbeat_timeout,
            reconnect_window=reconnect_window,
            closers=self._closers,
            preload=preload,
            output=OutputPrinter(resolve_prefix(output_prefix, nodes is None)) if forward_output else None,
        )
        self._scheduler.start()
        _live.add(self._scheduler)
        self._finalizer = weakref.finalize(self, _stop_scheduler, self._scheduler)
        self._scheduler.first_round.wait(connect_timeout + 5.0)
        self._check_connected()
        if nodes is not None and not self._max_workers:
            self._max_workers = sum(link.workers for link in links)

    @classmethod
    def from_cluster_file(
        cls, path: str | os.PathLike[str], group: str | None = None, port: int = DEFAULT_PORT, **kwargs: Any
    ) -> ClusterExecutor:
        """An executor on the hosts of ``group`` in a clusterit/PEAK cluster file (``GROUP:``
        and ``LUMP:`` sections; ``__all__`` is every host), each on ``port``. Other keyword
        arguments are the constructor's."""
        return cls(resolve_nodes(read_cluster_file(path, group), port), **kwargs)

    def _remote_links(
        self,
        nodes: list[NodeAddress | SshSpec],
        key: str | bytes | None,
        key_file: str | os.PathLike[str] | None,
        max_workers: int | None,
        request: SessionRequest,
        connect_timeout: float,
    ) -> list[NodeLink]:
        """One link per node; SSH nodes are started first (in parallel), each with its own key."""
        shares = _spread(max_workers, len(nodes))
        tcp_key = resolve_key(key, key_file) if any(isinstance(n, NodeAddress) for n in nodes) else None
        started = self._start_ssh_nodes([n for n in nodes if isinstance(n, SshSpec)], shares, nodes, connect_timeout)
        links = []
        for node, share in zip(nodes, shares, strict=True):
            if isinstance(node, SshSpec):
                ssh = started[node]
                codec = self._compression if ssh.options.compress is None else check_codec(ssh.options.compress)
                links.append(
                    NodeLink(ssh.address, ssh.key, request, share, connect_timeout, name=str(node), compression=codec)
                )
            else:
                links.append(NodeLink(node, tcp_key, request, share, connect_timeout, compression=self._compression))
        return links

    def _start_ssh_nodes(
        self, specs: list[SshSpec], shares: list[int | None], nodes: list[Any], connect_timeout: float
    ) -> dict[SshSpec, Any]:
        if not specs:
            return {}
        from clusterexec.launch.ssh import SshNode

        started: dict[SshSpec, Any] = {}
        errors: list[BaseException] = []

        def start(spec: SshSpec) -> None:
            try:
                started[spec] = SshNode(spec, shares[nodes.index(spec)], connect_timeout)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(spec,), daemon=True) for spec in specs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._closers.extend(node.stop for node in started.values())
        if errors:
            for close in self._closers:
                close()
            raise errors[0]
        return started

    def _check_connected(self) -> None:
        outcome = self._scheduler.first_outcome
        if any(ready for ready, _ in outcome):
            return
        errors = [error for _, error in outcome if error is not None]
        self.shutdown(wait=True)
        raise no_node_error(errors)

    # ------------------------------------------------------------------ submitting

    def _function(self, fn: Callable[..., Any]) -> FunctionPayload:
        if isinstance(fn, types.FunctionType):
            cached = self._functions.get(fn)
            if cached is None:
                cached = self._compressed(pickle_function(fn, self._catalog))
                self._functions[fn] = cached
            return cached
        return self._compressed(pickle_function(fn, self._catalog))

    def _compressed(self, function: FunctionPayload) -> FunctionPayload:
        # Compressed here, in the caller's thread, so the I/O thread finds it done.
        if self._compression is not None:
            function.payload.packed(self._compression)
        return function

    def _pickled(self, fn: Callable[..., Any]) -> FunctionPayload | BaseException:
        """The callable's payload, or the error pickling it raised (set on the future, as PPE does)."""
        try:
            return self._function(fn)
        except (Exception, SystemExit) as exc:  # a __reduce__ calling sys.exit() is the task's error
            _note(exc, f"the callable {fn!r} could not be pickled")
            return exc

    def _check_open(self) -> None:
        broken = self._scheduler.broken
        if broken is not None:
            raise BrokenCluster(str(broken))
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _queue(
        self,
        function: FunctionPayload | BaseException,
        make_payload: Callable[[], Payload],
        flags: int = 0,
        target: NodeLink | None = None,
    ) -> TaskFuture:
        future = self._scheduler.new_future()
        if isinstance(function, BaseException):
            future.set_exception(function)
            return future
        try:
            payload = make_payload()
            if self._compression is not None:
                payload.packed(self._compression)  # here, not in the I/O thread
        except (Exception, SystemExit) as exc:  # a __reduce__ calling sys.exit() is the task's error
            _note(exc, "the arguments of this task could not be pickled")
            future.set_exception(exc)
            return future
        with self._shutdown_lock:
            self._check_open()
            self._scheduler.submit(Task(future, function, payload, flags, target))
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return a Future.

        Never blocks on the network. Raises RuntimeError after shutdown and BrokenCluster once
        the cluster is broken; an argument that cannot be pickled becomes the future's exception.
        """
        with self._shutdown_lock:
            self._check_open()
        return self._queue(self._pickled(fn), lambda: dumps_call(args, kwargs, self._catalog))

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Return an iterator of ``fn(*args)`` over zipped ``iterables``, in order.

        As ``ProcessPoolExecutor.map`` of Python 3.14: the input is consumed at once unless
        ``buffersize`` is given; then ``buffersize`` tasks (chunks, with ``chunksize`` > 1) are
        submitted at the call, and each time the iterator resumes it submits one more before
        waiting for the next result. ``chunksize`` groups items into one task; the iterator
        raises the first failing item's exception at that item, and TimeoutError if ``timeout``
        seconds pass from the call. The argument checks and their messages are 3.14's, in its
        order (``chunksize`` first).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            self._check_open()
        # The iterator holds the executor weakly, as CPython's does: a forgotten executor
        # can be collected (and its nodes stopped) while an unfinished map is still around.
        executor_ref = weakref.ref(self)
        return map_tasks(executor_ref, self._pickled(fn), self._catalog, iterables, chunksize, buffersize, end_time)

    def submit_to(
        self, node: NodeStatus | NodeAddress | str | tuple[str, int], fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on one chosen node (an entry of :attr:`nodes` or its
        address). The task waits for that node if it is down; raises ValueError for a node that
        is not part of this executor."""
        link = self._link(node)
        with self._shutdown_lock:
            self._check_open()
        return self._queue(self._pickled(fn), lambda: dumps_call(args, kwargs, self._catalog), target=link)

    def _link(self, node: NodeStatus | NodeAddress | str | tuple[str, int]) -> NodeLink:
        names = {link.name for link in self._scheduler.links}
        if isinstance(node, NodeStatus):
            name = node.address
        elif isinstance(node, str) and node in names:
            name = node
        else:
            name = str(parse_address(node))
        for link in self._scheduler.links:
            if link.name == name:
                return link
        known = ", ".join(link.name for link in self._scheduler.links)
        raise ConfigurationError(f"node {name} is not one of this executor's nodes ({known})")

    @property
    def nodes(self) -> list[NodeStatus]:
        """Every node of this executor with its state (connecting, ready, lost...), worker count
        and tasks in flight. A snapshot; thread-safe."""
        return self._scheduler.node_statuses()

    def stats(self) -> ClusterStats:
        """Task counts: queued in the client, then per node queued, in flight, done and failed."""
        return self._scheduler.stats()

    def check(self, timeout: float = 5.0) -> ClusterReport:
        """Ask every node for a health report (in parallel, at most ``timeout`` seconds).

        A node that is not connected, or does not answer in time, is reported down with why.
        """
        results: dict[str, NodeReport] = {}
        links = self._scheduler.links

        def ask(link: NodeLink) -> None:
            info = self._scheduler.node_status(link, timeout)
            results[link.name] = link.health(info)

        threads = [threading.Thread(target=ask, args=(link,), daemon=True) for link in links]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 1.0)
        return ClusterReport([results.get(link.name) or link.health(None) for link in links])

    @property
    def _broken(self) -> str | bool:
        """Why the executor is broken, or False: ``ProcessPoolExecutor``'s and
        ``ThreadPoolExecutor``'s private flag, kept for code that polls it."""
        broken = self._scheduler.broken
        return str(broken) if broken is not None else False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, block until pending tasks are done and nodes closed.

        With ``cancel_futures``, tasks that have not started are cancelled (also those sent ahead
        to a node). Local nodes are stopped. Safe to call more than once.
        """
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            self._scheduler.cancel_pending()
        self._scheduler.stop()
        if wait:
            self._scheduler.join()

    def terminate_workers(self) -> None:
        """Shut down at once and send SIGTERM to every worker process of this executor, on every node.

        As ``ProcessPoolExecutor.terminate_workers()`` (Python 3.14): it does what
        ``shutdown(wait=False, cancel_futures=True)`` does, then signals the workers. Tasks that
        had not started are cancelled; each running task fails with
        :class:`~clusterexec.WorkerStoppedError` (a ``BrokenProcessPool``), unless it finished
        first. A worker still alive 2 s after SIGTERM is killed by its node. The nodes stay up
        and go on serving their other clients. Returns at once; the program can exit at once
        (at most a few seconds for the nodes' reports). ``submit`` raises RuntimeError afterwards;
        ``shutdown()`` is harmless. Thread-safe.
        """
        self._stop_workers(WORKERS_TERMINATE)

    def kill_workers(self) -> None:
        """Shut down at once and send SIGKILL to every worker process of this executor, on every node.

        As ``ProcessPoolExecutor.kill_workers()`` (Python 3.14), and as :meth:`terminate_workers`
        but with SIGKILL, which a task cannot catch or ignore. Thread-safe; returns at once.
        """
        self._stop_workers(WORKERS_KILL)

    def _stop_workers(self, how: int) -> None:
        # shutdown(wait=False, cancel_futures=True) and the signal in one request to the I/O
        # thread: were they two, it could close a link between them and the node never hear it.
        with self._shutdown_lock:
            self._shutdown = True
        self._scheduler.stop_workers(how)


def _spread(total: int | None, count: int) -> list[int | None]:
    """Split ``total`` workers over ``count`` nodes (None: each node's own count)."""
    if total is None:
        return [None] * count
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) or 1 for i in range(count)]


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(text)


__all__ = ["ClusterExecutor", "NodeAddress"]
