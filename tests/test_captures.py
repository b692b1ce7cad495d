"""Captured state: shared when immutable, copied when flat, unpickled otherwise, and never
mutated by one task for another (``clusterexec/code/captures.py``).

The end-to-end tests run real executors with one worker, so every task of a map runs in the
same worker process, and compare with what ProcessPoolExecutor gives where it can pickle the
callable. The classification itself is checked directly on callables, mode by mode.
"""

from __future__ import annotations

import functools
import pickle
from concurrent.futures import ProcessPoolExecutor

import cloudpickle
import helpers
import numpy as np
import pytest

from clusterexec import ClusterExecutor
from clusterexec.code.captures import CallableTemplate, Mode

pytestmark = pytest.mark.timeout(60)
TASKS = 12


def template(fn: object) -> CallableTemplate:
    """A worker's template of ``fn``, loaded (its first task served)."""
    held = CallableTemplate(cloudpickle.dumps(fn, protocol=5), [])
    held.for_task()
    return held


def make_closure(captured: object):
    def task(x: int) -> object:
        return (captured, x)

    return task


def make_counter():
    count = 0

    def task(x: int) -> int:
        nonlocal count
        count += 1
        return count

    return task


@pytest.mark.parametrize(
    ("fn", "mode"),
    [
        (helpers.square, Mode.SHARED),
        (functools.partial(helpers.first_byte_plus, b"x" * 1000), Mode.SHARED),
        (make_closure((1, "two", b"three", frozenset({4}), None, 2.5)), Mode.SHARED),
        (make_closure(np.zeros(10).copy().view()), Mode.COPIED),
        (functools.partial(helpers.append_and_count, [1, 2, 3]), Mode.COPIED),
        (functools.partial(helpers.set_key_and_count, {"a": 1}), Mode.COPIED),
        (make_closure([1, (2, 3)]), Mode.COPIED),
        (make_closure({1, 2}), Mode.COPIED),
        (make_closure(bytearray(b"abc")), Mode.COPIED),
        (make_closure([[1], [2]]), Mode.UNPICKLED),  # nested: a shallow copy would share the inner lists
        (functools.partial(helpers.fill_box, helpers.ItemBox()), Mode.UNPICKLED),
        (make_counter(), Mode.UNPICKLED),  # rebinds its closure variable
        (make_closure({"k": [1]}), Mode.UNPICKLED),
    ],
)
def test_each_callable_gets_the_cheapest_safe_mode(fn: object, mode: Mode) -> None:
    assert template(fn).mode is mode


def test_read_only_arrays_are_shared_and_writable_ones_copied() -> None:
    frozen = np.arange(100)
    frozen.flags.writeable = False
    held = template(functools.partial(helpers.bump_first, frozen))
    # A read-only array pickles to a read-only array only out of band; in band it comes back
    # writable, and is then copied per task.
    assert held.mode in (Mode.SHARED, Mode.COPIED)
    writable = template(functools.partial(helpers.bump_first, np.arange(100)))
    assert writable.mode is Mode.COPIED
    first, second = writable.for_task(), writable.for_task()
    assert first(5) == 5 and second(5) == 5


def test_over_budget_falls_back_to_unpickling() -> None:
    data = cloudpickle.dumps(functools.partial(helpers.append_and_count, list(range(1000))), protocol=5)
    held = CallableTemplate(data, [], budget=10)
    held.for_task()
    assert held.mode is Mode.UNPICKLED


def test_copied_functions_keep_their_name_defaults_and_globals() -> None:
    def task(x: int, scale: int = 3, seen: list = [7]) -> tuple[int, int]:  # noqa: B006
        seen.append(x)
        return x * scale, len(seen)

    held = template(task)
    assert held.mode is Mode.COPIED
    one, two = held.for_task(), held.for_task()
    assert one(2) == (6, 2) and two(2) == (6, 2)
    assert one.__name__ == "task" and one.__qualname__.endswith("task")


MUTATING = [
    pytest.param(functools.partial(helpers.append_and_count, [1, 2, 3]), [4] * TASKS, id="list"),
    pytest.param(functools.partial(helpers.set_key_and_count, {-1: -1}), [2] * TASKS, id="dict"),
    pytest.param(functools.partial(helpers.fill_box, helpers.ItemBox()), [1] * TASKS, id="object"),
    pytest.param(functools.partial(helpers.bump_first, np.zeros(4, dtype=np.int64)), list(range(TASKS)), id="array"),
]


@pytest.mark.parametrize(("fn", "expected"), MUTATING)
def test_no_task_sees_another_tasks_mutation(fn: object, expected: list[int]) -> None:
    with ClusterExecutor(1) as ex:  # one worker: every task runs in the same process
        assert list(ex.map(fn, range(TASKS))) == expected
        assert len({ex.submit(helpers.pid).result(timeout=20)}) == 1


@pytest.mark.parametrize(("fn", "expected"), MUTATING)
def test_as_process_pool_executor_does(fn: object, expected: list[int]) -> None:
    with ProcessPoolExecutor(1) as ex:
        assert list(ex.map(fn, range(TASKS))) == expected


def test_closures_and_rebinding_counters_start_afresh_for_every_task() -> None:
    items = [0]

    def append(x: int) -> int:
        items.append(x)
        return len(items)

    with ClusterExecutor(1) as ex:
        assert list(ex.map(append, range(TASKS))) == [2] * TASKS
        assert list(ex.map(make_counter(), range(TASKS))) == [1] * TASKS
        nested = [[0]]
        assert list(ex.map(lambda x: nested[0].append(x) or len(nested[0]), range(TASKS))) == [2] * TASKS


def test_an_immutable_capture_is_shared_and_every_task_reads_it_whole() -> None:
    data = b"\x07" * (4 << 20)
    with ClusterExecutor(1) as ex:
        fn = functools.partial(helpers.first_byte_plus, data)
        assert list(ex.map(fn, range(TASKS))) == [7 + i for i in range(TASKS)]
    assert pickle.loads(pickle.dumps(fn)).args[0] == data


@pytest.mark.parametrize("order", ["C", "F"])
def test_big_writable_arrays_are_served_copy_on_write(order: str) -> None:
    array = np.asarray(np.arange(600_000, dtype=np.int64).reshape(1000, 600), order=order)  # 4.8 MB
    held = template(functools.partial(helpers.bump_first, array))
    assert held.mode is Mode.COPIED
    first, second = held.for_task().args[0], held.for_task().args[0]
    assert first.flags.writeable and first.flags[f"{order}_CONTIGUOUS"]
    assert np.array_equal(first, array) and np.array_equal(second, array)
    first[0, 0] = -1  # each task's writes are its own
    assert second[0, 0] == 0 and held.for_task().args[0][0, 0] == 0


def test_large_captured_bytes_travel_out_of_band_and_come_back_as_bytes() -> None:
    from clusterexec.code.captures import CallableTemplate as Template
    from clusterexec.code.serialize import pickle_function

    data = bytes(range(256)) * 4096  # 1 MiB
    payload = pickle_function(functools.partial(helpers.first_byte_plus, data)).payload
    assert len(payload.body) < 64 * 1024 and sum(len(memoryview(b)) for b in payload.buffers) >= len(data)
    held = Template(payload.body, [bytearray(b) for b in payload.buffers])
    task = held.for_task()
    assert held.mode is Mode.SHARED and type(task.args[0]) is bytes and task.args[0] == data
