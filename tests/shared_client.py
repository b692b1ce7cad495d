"""One client of a shared node, run as a process of its own by tests/test_shared_nodes.py and
benchmarks/shared.py: ``python shared_client.py ADDRESS KEY_FILE COUNT SECONDS GO OUT``.

It connects, writes ``OUT.ready``, waits for the file GO to exist (so that every client starts
at once), maps ``helpers.timed_nap(SECONDS)`` over COUNT tasks and writes to OUT, as JSON, when
it started and each task's (start, end, worker pid).
"""

from __future__ import annotations

import json
import os
import sys
import time

import helpers

from clusterexec import ClusterExecutor


def wait_for(path: str, timeout: float = 60.0) -> None:
    """Wait for a file to exist (the starting signal)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.005)


def main(argv: list[str]) -> int:
    address, key_file, count, seconds, go, out = argv
    with ClusterExecutor([address], key_file=key_file) as ex:
        open(out + ".ready", "w").close()
        wait_for(go)
        started = time.time()
        spans = list(ex.map(helpers.timed_nap, [float(seconds)] * int(count)))
    with open(out + ".tmp", "w") as file:
        json.dump({"started": started, "spans": spans}, file)
    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
