"""A quick script the way many are written: no ``if __name__ == "__main__":`` guard.

Run it from the repository root, with an optional count::

    python examples/quick_script.py 1000

With ProcessPoolExecutor on Linux this works because the workers are forks. It works the same
with ClusterExecutor: the top level of this script reads ``sys.argv`` and creates the executor,
so it is never run again on a worker; ``cube`` travels by value instead, as a fork would see it.
"""

import sys

from clusterexec import ClusterExecutor  # was: from concurrent.futures import ProcessPoolExecutor

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000


def cube(x):
    return x**3


def arguments():
    return sys.argv  # read on the worker


ex = ClusterExecutor(2)  # was: ProcessPoolExecutor(2)
print(f"sum of cubes below {n}: {sum(ex.map(cube, range(n)))}")
print(f"the workers saw the same argv: {ex.submit(arguments).result() == sys.argv}")
