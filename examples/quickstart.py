"""Quickstart: ClusterExecutor as a drop-in for ProcessPoolExecutor, on local nodes.

Run it from the repository root::

    python examples/quickstart.py

``ClusterExecutor()`` with no nodes starts a node on this machine (loopback only, with a fresh
random key) and stops it again at the end of the ``with`` block: no set-up needed.
"""

from __future__ import annotations

import math
import time

from clusterexec import ClusterExecutor


def count_primes(start: int, stop: int) -> int:
    """The number of primes in ``[start, stop)``, by trial division (deliberately CPU-bound)."""
    count = 0
    for n in range(max(start, 2), stop):
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            count += 1
    return count


def checked_sqrt(x: float) -> float:
    """``math.sqrt`` that refuses negative numbers with a ValueError (raised on the worker)."""
    if x < 0:
        raise ValueError(f"cannot take the square root of {x}")
    return math.sqrt(x)


def main() -> None:
    limit, step = 200_000, 20_000
    blocks = list(range(0, limit, step))
    started = time.perf_counter()
    with ClusterExecutor() as ex:  # the same line with ProcessPoolExecutor() works the same way
        # map: one task per block, results in order.
        counts = list(ex.map(count_primes, blocks, [b + step for b in blocks]))
        for block, count in zip(blocks, counts, strict=True):
            print(f"primes in [{block:>7}, {block + step:>7}): {count}")
        print(f"primes below {limit}: {sum(counts)}")

        # submit: a Future per call.
        future = ex.submit(checked_sqrt, 2.0)
        print(f"checked_sqrt(2.0) = {future.result():.6f}")

        # An exception raised on a worker is re-raised by result() as the same type.
        failing = ex.submit(checked_sqrt, -1.0)
        try:
            failing.result()
        except ValueError as exc:
            print(f"caught the remote exception: {type(exc).__name__}: {exc}")
    print(f"done in {time.perf_counter() - started:.2f}s")


# The guard keeps main() from running again where the script is re-run (as ``__mp_main__``,
# on workers, to find count_primes by name); examples/quick_script.py works without one.
if __name__ == "__main__":
    main()
