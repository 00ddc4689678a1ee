"""``python held_cli.py K READY <canopy args>``: ``canopy`` parked inside its (K+1)-th shard commit.

The kill/resume tests run this as the child to kill: once K rollout shards are committed, the
next commit (its prompt already sampled, its prompt row already written) writes READY and
blocks on stdin, so the parent kills on observed progress, never at a moment picked by a clock.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from canopy_entropy.store import RunStore


def main() -> None:
    k, ready, args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    commit = RunStore.write_rollouts
    calls = 0

    def held(self: RunStore, name: str, table):
        nonlocal calls
        if calls == k:
            ready.write_text(name)
            sys.stdin.read()  # parked until the parent kills us; EOF: the parent is gone
            os._exit(70)
        calls += 1
        return commit(self, name, table)

    RunStore.write_rollouts = held
    sys.argv = ["canopy", *args]
    from canopy_entropy.cli.main import main as canopy

    canopy()


if __name__ == "__main__":
    main()
