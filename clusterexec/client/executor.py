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

from clusterexec.client.health import check_nodes
from clusterexec.client.inprocess import HostedLink
from clusterexec.client.lifetime import interpreter_exiting, stop_scheduler, track
from clusterexec.client.link import NodeLink, SessionRequest, no_node_error
from clusterexec.client.mapping import map_tasks
from clusterexec.client.options import DEFAULT_OPTIONS, UNSET, ExecutorView, TaskOptions, make_view
from clusterexec.client.output import OutputPrinter, PrefixChoice, resolve_prefix
from clusterexec.client.report import ClusterReport, ClusterStats, NodeStatus
from clusterexec.client.scheduler import Scheduler
from clusterexec.client.starting import allocation_links, is_slurm_start, remote_links
from clusterexec.client.tasks import Task, TaskFuture
from clusterexec.code.mainscript import prepare_worker
from clusterexec.code.serialize import FunctionPayload, Payload, dumps, dumps_call, pickle_function
from clusterexec.code.shipping import ModuleCatalog, rerunning_main
from clusterexec.errors import BrokenCluster, ConfigurationError
from clusterexec.keys import resolve_key
from clusterexec.launch.local import LOCAL_NODE_ENV, LocalNode
from clusterexec.launch.specs import (
    ALL_GROUP,
    DEFAULT_PORT,
    NodeAddress,
    cluster_from_env,
    parse_address,
    read_cluster_file,
    resolve_nodes,
)
from clusterexec.node.hosted import can_host
from clusterexec.wire.compression import check_codec
from clusterexec.wire.messages import WORKERS_KILL, WORKERS_TERMINATE

T = TypeVar("T")

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
            links = [self._local_link(request, connect_timeout)]
        elif is_slurm_start(nodes):
            explicit_key = resolve_key(key, key_file) if key is not None or key_file is not None else None
            args = (max_workers, request, connect_timeout, self._compression, self._closers)
            links = allocation_links(explicit_key, *args)
            self._max_workers = max_workers or 0
        else:
            resolved = resolve_nodes(nodes)
            tcp_key = resolve_key(key, key_file) if any(isinstance(n, NodeAddress) for n in resolved) else None
            args = (max_workers, request, connect_timeout, self._compression, self._closers)
            links = remote_links(resolved, tcp_key, *args)
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
        track(self._scheduler)
        self._finalizer = weakref.finalize(self, stop_scheduler, self._scheduler)
        # What a node that joins later (a Slurm job's) is asked for.
        self._request, self._connect_timeout = request, connect_timeout
        self._scheduler.first_round.wait(connect_timeout + 5.0)
        self._check_connected()
        if nodes is not None and not self._max_workers:
            self._max_workers = sum(link.workers for link in links)

    def _local_link(self, request: SessionRequest, connect_timeout: float) -> NodeLink:
        """The link to the local node: hosted by the I/O thread where the platform allows (no
        node process between the client and its workers), else a node process on loopback."""
        if can_host() and os.environ.get(LOCAL_NODE_ENV, "") != "process":
            return HostedLink(request, self._max_workers, compression=self._compression)
        local = LocalNode(self._max_workers)
        self._closers.append(local.stop)
        return NodeLink(
            local.address, local.key, request, self._max_workers, connect_timeout, compression=self._compression
        )

    @classmethod
    def from_cluster_file(
        cls, path: str | os.PathLike[str], group: str | None = None, port: int = DEFAULT_PORT, **kwargs: Any
    ) -> ClusterExecutor:
        """An executor on the hosts of ``group`` in a clusterit/PEAK cluster file (``GROUP:``
        and ``LUMP:`` sections; ``__all__`` is every host), each on ``port``. Other keyword
        arguments are the constructor's."""
        return cls(resolve_nodes(read_cluster_file(path, group), port), **kwargs)

    @classmethod
    def from_slurm(
        cls,
        nodes: int = 1,
        time: str | None = None,
        partition: str | None = None,
        *,
        client_address: str | None = None,
        python: str | None = None,
        start_timeout: float | None = None,
        **options: Any,
    ) -> ClusterExecutor:
        """An executor on the nodes of a Slurm job it submits (from a login node; see docs/nodes.md).

        Submits one ``sbatch`` job of ``nodes`` hosts (``time`` and ``partition`` as sbatch's;
        other keyword arguments are the constructor's when it has them, else sbatch options:
        ``cpus_per_task=8`` is ``--cpus-per-task=8``). Blocks until the first node is ready
        (at most ``start_timeout`` seconds; None waits as long as the job queues), then returns;
        the other nodes join as they come up. The job calls back to ``client_address`` (default:
        this host's name), with ``python`` (default: this interpreter) on the compute nodes.
        Shutdown cancels the job, and so does this process dying. Raises ConfigurationError if
        sbatch refuses the job, NodeUnreachableError if it ends or times out before a node is up.
        """
        from clusterexec.client.starting import from_slurm

        return from_slurm(cls, nodes, time, partition, client_address, python, start_timeout, dict(options))

    def _stop_with(self, close: Callable[[], None]) -> None:
        """Have shutdown call ``close`` after the links are closed (a Slurm job's cancel)."""
        self._closers.append(close)  # the scheduler's own list

    def _add_node(self, address: NodeAddress, key: bytes) -> None:
        """Add a node that came up after construction (a Slurm job's). Thread-safe."""
        link = NodeLink(address, key, self._request, None, self._connect_timeout, compression=self._compression)
        self._scheduler.add_link(link)

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
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _queue(
        self,
        function: FunctionPayload | BaseException,
        make_payload: Callable[[], Payload],
        flags: int = 0,
        options: TaskOptions = DEFAULT_OPTIONS,
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
            self._scheduler.submit(Task(future, function, payload, flags, options))
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return a Future.

        Never blocks on the network. Raises RuntimeError after shutdown and BrokenCluster once
        the cluster is broken; an argument that cannot be pickled becomes the future's exception.
        """
        return self._submit(fn, args, kwargs, DEFAULT_OPTIONS)

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], options: TaskOptions
    ) -> Future[T]:
        with self._shutdown_lock:
            self._check_open()
        return self._queue(self._pickled(fn), lambda: dumps_call(args, kwargs, self._catalog), options=options)

    def options(self, *, timeout: Any = UNSET, retries: Any = UNSET, node: Any = UNSET) -> ExecutorView:
        """A view of this executor whose ``submit`` and ``map`` give each task these options.

        ``timeout``: seconds a task may run on its worker; past it the worker is killed (and
        replaced) and the task fails with :class:`~clusterexec.TaskTimeoutError`. ``retries``:
        times a task is sent again after its node is lost. ``node``: the one node the tasks run
        on (``submit_to`` is ``options(node=...).submit``). Raises TypeError or ValueError for a
        bad value, ConfigurationError for a node that is not this executor's."""
        return make_view(self, DEFAULT_OPTIONS, timeout, retries, node)

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
        return self._map(fn, iterables, timeout, chunksize, buffersize, DEFAULT_OPTIONS)

    def _map(
        self,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        options: TaskOptions,
    ) -> Iterator[T]:
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            self._check_open()
        # The iterator holds the executor weakly, as CPython's does: a forgotten executor
        # can be collected (and its nodes stopped) while an unfinished map is still around.
        executor_ref = weakref.ref(self)
        function = self._pickled(fn)
        return map_tasks(executor_ref, function, self._catalog, iterables, chunksize, buffersize, end_time, options)

    def submit_to(
        self, node: NodeStatus | NodeAddress | str | tuple[str, int], fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on one chosen node (an entry of :attr:`nodes` or its
        address). The task waits for that node if it is down; raises ValueError for a node that
        is not part of this executor."""
        return self._submit(fn, args, kwargs, TaskOptions(node=self._link(node)))

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
        """Every node's health report, asked in parallel (at most ``timeout`` seconds): a node
        not connected or silent is down, with why; ``packages`` lists the packages the tasks so
        far referred to by name whose version differs on the node from here."""
        return check_nodes(self._scheduler, timeout, sorted(self._catalog.packages))

    @property
    def _broken(self) -> str | bool:
        """Why the executor is broken, or False: ``ProcessPoolExecutor``'s and
        ``ThreadPoolExecutor``'s private flag, kept for code that polls it."""
        broken = self._scheduler.broken
        return str(broken) if broken is not None else False

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: object, exc_tb: object) -> None:
        """``shutdown(wait=True)``; after a KeyboardInterrupt (Ctrl-C), with ``cancel_futures=True``."""
        self.shutdown(wait=True, cancel_futures=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

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

        As ``ProcessPoolExecutor.terminate_workers()`` (Python 3.14): ``shutdown(wait=False,
        cancel_futures=True)``, then the signal. Each running task fails with
        :class:`~clusterexec.WorkerStoppedError` unless it finished first; a worker alive 2 s
        after SIGTERM is killed. The nodes go on serving others. Returns at once; thread-safe.
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


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(text)


__all__ = ["ClusterExecutor", "NodeAddress"]
