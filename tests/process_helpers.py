"""Child processes in tests: killed on observed progress, waited on without speed limits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from canopy_entropy.store import RunStore

HELD_CLI = Path(__file__).with_name("held_cli.py")
# Hang guards only: a child that makes no progress at all for this long is stuck, not slow.
STALL_S = 1800.0
POLL_S = 0.05


def kill_after_commits(args: list[str], env: dict, run_dir: Path, k: int, log: Path) -> int:
    """Run ``canopy <args>``, SIGKILL it while parked in its (k+1)-th shard commit.

    Returns the number of committed shards left in ``run_dir`` (the caller asserts it is k).
    Fails only if the child exits early or commits nothing new for ``STALL_S`` seconds.
    """
    ready = log.with_suffix(".ready")
    with log.open("w") as out:
        cmd = [sys.executable, str(HELD_CLI), str(k), str(ready), *args]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=out)
    try:
        seen, last = -1, time.monotonic()
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"child exited ({proc.returncode}): {log.read_text()}")
            n = len(RunStore(run_dir).shard_files())
            if n != seen:
                seen, last = n, time.monotonic()
            elif time.monotonic() - last > STALL_S:
                raise AssertionError(f"no shard committed for {STALL_S:.0f} s: {log.read_text()}")
            time.sleep(POLL_S)
    finally:
        proc.kill()  # no-op once the child has been reaped
        proc.wait()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return len(RunStore(run_dir).shard_files())
