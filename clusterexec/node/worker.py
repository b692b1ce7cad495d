"""The worker process loop: run a task, send back a result or an error.

A worker is forked by its node for one session and talks to the node over a socketpair with
unsealed frames. It keeps the pickled functions the node forwards (by digest) and unpickles a
fresh copy for every task, so tasks never share state through a callable object.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from clusterexec.code.captures import CallableTemplate
from clusterexec.code.serialize import (
    Payload,
    capture_exception,
    dumps,
    dumps_failure,
    dumps_result,
    loads,
    unpickling_error,
)
from clusterexec.code.shipping import ShippedModules
from clusterexec.wire.channel import BlockingChannel, ConnectionClosed
from clusterexec.wire.compression import unpack
from clusterexec.wire.frames import Message
from clusterexec.wire.messages import (
    FLAG_CHUNK,
    INIT_FAILED,
    RESULT,
    RESULT_HEAD,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PARTIAL,
    TASK_HEAD,
    Kind,
    pack_json,
    task_payload_offset,
    unexpected,
)
from clusterexec.wire.sealing import PlainOpener, PlainSealer

LOGGER = logging.getLogger("concurrent.futures")
log = logging.getLogger("clusterexec.node")

# The exit status of a worker that received a message kind it does not take.
EXIT_UNEXPECTED = 3


class Worker:
    """One worker's state: its channel to the node and the functions it holds.

    ``compression`` is the codec the session negotiated for results (None: results go plain);
    what arrives compressed is decompressed whatever it is."""

    def __init__(self, sock: socket.socket, compression: str | None = None) -> None:
        self.channel = BlockingChannel(sock, PlainSealer(), PlainOpener())
        self.compression = compression
        self.functions: dict[bytes, CallableTemplate] = {}
        self.shipped = ShippedModules()
        self.shipped.install()
        self.init: Message | None = None
        self.running = False  # a task's code runs: a SIGINT interrupts it

    def _on_sigint(self, signum: int, frame: object) -> None:
        # As in ProcessPoolExecutor's workers, which share the terminal's process group: a
        # Ctrl-C raises KeyboardInterrupt in the task it interrupts (its outcome), and does
        # nothing to a worker between tasks.
        if self.running:
            raise KeyboardInterrupt

    def serve(self) -> int:
        """Handle messages until STOP or the node goes away; return the exit status.

        A message of a kind the worker does not take is logged, naming the kind, and ends the
        worker with EXIT_UNEXPECTED: ignoring it could leave a task unanswered for ever."""
        handlers = HANDLERS
        signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            try:
                message = self.channel.receive()
            except ConnectionClosed:
                return 0
            handler = handlers.get(message.kind)
            if handler is None:
                log.error("clusterexec worker %d: %s; exiting", os.getpid(), unexpected(message.kind, "from the node"))
                return EXIT_UNEXPECTED
            status = handler(self, message)
            if status is not None:
                return status

    def _on_task(self, message: Message) -> int | None:
        if self.init is not None:
            init, self.init = self.init, None
            if not self.run_initializer(init):
                return 1
        self.run_task(message)
        return None

    def _on_func(self, message: Message) -> None:
        body, buffers = unpack(memoryview(message.body)[16:], message.buffers)
        self.functions[bytes(message.body[:16])] = CallableTemplate(body, buffers)

    def _on_forget(self, message: Message) -> None:
        self.functions.pop(bytes(message.body[:16]), None)

    def _on_modules(self, message: Message) -> None:
        self.shipped.add(*unpack(message.body, message.buffers))

    def _on_init(self, message: Message) -> None:
        # Run just before the first task, once the modules it may need have arrived.
        self.init = message

    def _on_stop(self, message: Message) -> int:
        return 0

    def run_initializer(self, message: Message) -> bool:
        """Run the session's initializer; on failure tell the node (and so the client), return False."""
        try:
            initializer, initargs = loads(message.body, message.buffers)
            initializer(*initargs)
        except BaseException as exc:
            # Logged by the client (on its "concurrent.futures" logger, as ProcessPoolExecutor
            # logs it), where the user's logging configuration is: not here as well.
            failure = capture_exception(exc)
            self.channel.send(INIT_FAILED, pack_json({"error": failure.text, "type": failure.type_name}))
            return False
        return True

    def run_task(self, message: Message) -> None:
        """Run one task and send its RESULT message."""
        task_id, digest, flags = TASK_HEAD.unpack_from(message.body, 0)
        started = time.perf_counter()
        status, payload = self._call(task_id, digest, flags, message)
        # The run time lets the client tell its link's round trip from the task's own work.
        run_us = min(int((time.perf_counter() - started) * 1e6), 0xFFFFFFFF)
        if self.compression is not None:
            payload = payload.packed(self.compression)
        self.channel.send(RESULT, RESULT_HEAD.pack(task_id, status, run_us) + payload.body, payload.buffers)

    def _call(self, task_id: int, digest: bytes, flags: int, message: Message) -> tuple[int, Payload]:
        held = self.functions.get(digest)
        try:
            if held is None:
                raise RuntimeError("clusterexec internal error: task refers to a function the worker does not hold")
            fn = held.for_task()
            args, kwargs = loads(*unpack(memoryview(message.body)[task_payload_offset(flags) :], message.buffers))
        except BaseException as exc:  # even SystemExit from a __reduce__ fails this task alone
            error = unpickling_error(
                task_id,
                "on the worker",
                "its function or arguments",
                exc,
                "The modules they need must be installed on the node or shipped "
                "(ClusterExecutor(modules=[...])), and their __reduce__/__setstate__ must not fail.",
            )
            # The versions here of the packages the pickles name: the client compares them
            # with its own and names those that differ, the usual cause.
            error.node_packages = _packages_named(held, message)  # type: ignore[attr-defined]
            return STATUS_ERROR, dumps_failure(error)
        if flags & FLAG_CHUNK:
            return self._call_chunk(fn, args[0])
        try:
            self.running = True
            value = fn(*args, **kwargs) if kwargs else fn(*args)
            self.running = False
        except BaseException as exc:
            self.running = False
            return STATUS_ERROR, dumps_failure(exc)
        del fn, args, kwargs
        try:
            return STATUS_OK, dumps_result(value)
        except BaseException as exc:
            return STATUS_ERROR, dumps_failure(exc)

    def _call_chunk(self, fn: Any, chunk: list[tuple[Any, ...]]) -> tuple[int, Payload]:
        results: list[Any] = []
        for args in chunk:
            try:
                self.running = True
                results.append(fn(*args))
                self.running = False
            except BaseException as exc:
                self.running = False
                try:
                    return STATUS_PARTIAL, dumps((results, capture_exception(exc)))
                except BaseException as inner:
                    return STATUS_ERROR, dumps_failure(inner)
        try:
            return STATUS_OK, dumps(results)
        except BaseException as exc:
            return STATUS_ERROR, dumps_failure(exc)


def _packages_named(function: CallableTemplate | None, task: Message) -> dict[str, str]:
    """This worker's versions of the third-party packages a task's pickles refer to by name."""
    from clusterexec.code.versions import pickle_packages, versions

    names: list[str] = []
    try:
        pieces = [(function.body, function.buffers)] if function is not None else []
        _, _, flags = TASK_HEAD.unpack_from(task.body, 0)
        pieces.append(unpack(memoryview(task.body)[task_payload_offset(flags) :], task.buffers))
        for body, _buffers in pieces:
            names.extend(n for n in pickle_packages(body) if n not in names)
    except Exception:  # best effort: the error itself is what matters
        pass
    return versions(names)


# What each kind from the node does (as execnet's Message._types); a handler returns an exit
# status to end the loop, None to go on. A kind missing here is one this worker does not take.
HANDLERS: dict[int, Callable[[Worker, Message], int | None]] = {
    Kind.TASK: Worker._on_task,
    Kind.FUNC: Worker._on_func,
    Kind.FORGET: Worker._on_forget,
    Kind.MODULES: Worker._on_modules,
    Kind.INIT: Worker._on_init,
    Kind.STOP: Worker._on_stop,
}


def main(sock: socket.socket, compression: str | None = None) -> None:
    """Entry point of a forked worker: serve, then exit without running the node's cleanup.
    ``compression``: the session's codec for results, or None."""
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    status = 1
    try:
        status = Worker(sock, compression).serve()
    except BaseException:
        LOGGER.exception("clusterexec worker failed")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
