"""Thread counts chosen on purpose: one worker per physical core this process may use.

torch's default (every logical CPU, ignoring affinity and container quotas) oversubscribes a
busy or hyper-threaded machine, and the tokenizers' own pool competes with torch's. Here torch
intra-op threads and the BLAS pools get the physical cores available to the process, the
tokenizers' pool is turned off, and any of these the user set in the environment wins.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# the environment variables by which a user fixes each pool (first set one wins)
TORCH_VARS = ("TORCH_NUM_THREADS", "OMP_NUM_THREADS")
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """What each pool gets and why: ``*_source`` is the variable that decided it, or 'auto'."""

    cores: int  # physical cores this process may use
    torch: int
    torch_source: str
    blas: int
    blas_source: str
    tokenizers_parallel: bool
    tokenizers_source: str

    def line(self) -> str:
        """One line for the run summary."""

        def said(source: str) -> str:
            return "" if source == "auto" else f" ({source})"

        tok = "on" if self.tokenizers_parallel else "off"
        return (
            f"threads: torch {self.torch}{said(self.torch_source)}, BLAS {self.blas}"
            f"{said(self.blas_source)}, tokenizers pool {tok}{said(self.tokenizers_source)}; "
            f"{self.cores} physical core{'s' if self.cores != 1 else ''} available"
        )


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of a container (cgroup v2 ``cpu.max``), in CPUs, or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cores(
    logical_allowed: int, logical_total: int, physical_total: int | None, quota: float | None
) -> int:
    """Physical cores a process may use: its allowed logical CPUs scaled by the machine's
    physical to logical ratio (hyper-threads add little compute), capped by a CPU quota."""
    physical_total = physical_total or logical_total
    cores = max(1, round(logical_allowed * physical_total / max(logical_total, 1)))
    if quota:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def machine_cores() -> int:
    """``available_cores`` from this machine: affinity, CPU counts (psutil when installed for
    the physical one) and the cgroup quota."""
    total = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    physical = None
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        physical = psutil.cpu_count(logical=False)
    return available_cores(allowed, total, physical, _cgroup_cpus())


def scan_threads() -> int:
    """Threads for a scan of the store: one per CPU this process may use (Parquet decoding
    and numpy release the GIL, and hyper-threads help decoding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _from_env(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[int, str] | None:
    """The first positive integer among ``names`` in ``env`` with its name, or None."""
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    return None


def choose_threads(env: Mapping[str, str], cores: int) -> ThreadChoice:
    """The thread counts for ``cores`` physical cores, the user's settings in ``env`` first."""
    torch_set = _from_env(env, TORCH_VARS)
    blas_set = _from_env(env, BLAS_VARS)
    tok = env.get("TOKENIZERS_PARALLELISM")
    return ThreadChoice(
        cores=cores,
        torch=torch_set[0] if torch_set else cores,
        torch_source=torch_set[1] if torch_set else "auto",
        blas=blas_set[0] if blas_set else cores,
        blas_source=blas_set[1] if blas_set else "auto",
        tokenizers_parallel=tok is not None and tok.strip().lower() in ("1", "true", "yes", "on"),
        tokenizers_source="TOKENIZERS_PARALLELISM" if tok is not None else "auto",
    )


_applied: ThreadChoice | None = None


def configure_threads(env: Mapping[str, str] | None = None) -> ThreadChoice:
    """Choose and apply the thread counts (torch if installed, BLAS via threadpoolctl if
    installed, the tokenizers' pool); call once before heavy work. Returns the choice."""
    global _applied
    env = os.environ if env is None else env
    choice = choose_threads(env, machine_cores())
    if choice.tokenizers_source == "auto":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(choice.torch)
    if choice.blas_source == "auto" and importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits

        # torch's own OpenMP pool is set above; this caps numpy/scipy's BLAS pools
        threadpool_limits(limits=choice.blas, user_api="blas")
    _applied = choice
    return choice


def summary_line() -> str | None:
    """The run summary's line: the applied choice, else torch's current count, else None."""
    if _applied is not None:
        return _applied.line()
    if "torch" in sys.modules:
        return f"threads: torch {sys.modules['torch'].get_num_threads()} (not configured)"
    return None
