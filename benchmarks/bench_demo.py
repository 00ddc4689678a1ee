"""Time the whole offline demo (`canopy run` with no arguments) from a fresh run folder.

Target (issue 4): under 15 minutes on a 2-core CPU machine with only `pip install` done.
Prints wall-clock and CPU seconds of the whole command and each later stage's seconds.

    OMP_NUM_THREADS=2 python benchmarks/bench_demo.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "demo"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    src = Path(__file__).parents[1] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "canopy_entropy", "run", "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(proc.stdout[-4000:])
    print(f"exit code            {proc.returncode}")
    print(f"wall clock           {wall:8.1f} s  (target < 900 s on 2 cores)")
    print(f"CPU (user + system)  {usage.ru_utime + usage.ru_stime:8.1f} s")
    later = 0.0
    for marker in sorted((out / ".canopy" / "stages").glob("*.json")):
        seconds = json.loads(marker.read_text())["seconds"]
        later += seconds
        print(f"  {marker.stem:<18} {seconds:8.1f} s")
    print(f"  generate (+ start)  {wall - later:8.1f} s")


if __name__ == "__main__":
    main()
