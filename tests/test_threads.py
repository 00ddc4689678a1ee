"""Thread counts: physical cores available to the process, the user's settings first."""

from __future__ import annotations

import io
import os

import pytest

from canopy_entropy import threads
from canopy_entropy.threads import _cgroup_cpus, available_cores, choose_threads

_ENV = ("TORCH_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
        "TOKENIZERS_PARALLELISM")  # fmt: skip


@pytest.mark.parametrize(
    ("allowed", "total", "physical", "quota", "want"),
    [
        (16, 16, 8, None, 8),  # hyper-threaded: 2 logical CPUs per core
        (8, 16, 8, None, 4),  # half the CPUs by affinity: half the cores
        (1, 16, 8, None, 1),  # never 0
        (16, 16, None, None, 16),  # physical count unknown: the logical CPUs
        (16, 16, 8, 2.5, 3),  # a container quota of 2.5 CPUs: 3 threads
        (2, 2, 2, 0.5, 1),
    ],
)
def test_available_cores(allowed, total, physical, quota, want):
    assert available_cores(allowed, total, physical, quota) == want


def test_cgroup_quota(tmp_path):
    assert _cgroup_cpus(tmp_path) is None  # no cgroup file
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_cpus(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(tmp_path) is None


def test_machine_cores_is_within_what_the_process_may_use():
    assert 1 <= threads.machine_cores() <= len(os.sched_getaffinity(0))


def test_auto_choice_uses_the_cores_and_turns_the_tokenizers_pool_off():
    c = choose_threads({}, 6)
    assert (c.torch, c.blas, c.tokenizers_parallel) == (6, 6, False)
    assert c.torch_source == c.blas_source == c.tokenizers_source == "auto"
    assert c.line() == ("threads: torch 6, BLAS 6, tokenizers pool off; 6 physical cores available")


def test_user_settings_win():
    c = choose_threads({"OMP_NUM_THREADS": "3"}, 8)
    assert (c.torch, c.torch_source, c.blas, c.blas_source) == (3, "OMP_NUM_THREADS", 3,
                                                                "OMP_NUM_THREADS")  # fmt: skip
    c = choose_threads(
        {"TORCH_NUM_THREADS": "2", "OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "1",
         "TOKENIZERS_PARALLELISM": "true"}, 8,
    )  # fmt: skip
    assert (c.torch, c.torch_source, c.blas, c.blas_source) == (2, "TORCH_NUM_THREADS", 1,
                                                                "OPENBLAS_NUM_THREADS")  # fmt: skip
    assert c.tokenizers_parallel and c.tokenizers_source == "TOKENIZERS_PARALLELISM"
    assert (
        "torch 2 (TORCH_NUM_THREADS)" in c.line() and "pool on (TOKENIZERS_PARALLELISM)" in c.line()
    )
    assert not choose_threads({"TOKENIZERS_PARALLELISM": "false"}, 1).tokenizers_parallel
    c = choose_threads({"OMP_NUM_THREADS": "0", "TORCH_NUM_THREADS": "many"}, 4)
    assert (c.torch, c.torch_source) == (4, "auto")  # not a positive count: not a setting


def test_configure_threads_applies_the_choice(monkeypatch):
    torch = pytest.importorskip("torch")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "machine_cores", lambda: 2)
    before = torch.get_num_threads()
    blas_before = threadpoolctl.threadpool_info()
    try:
        assert threads.summary_line() == f"threads: torch {before} (not configured)"
        choice = threads.configure_threads()
        assert torch.get_num_threads() == choice.torch == 2
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 2 for p in blas)
        assert threads.summary_line() == choice.line()

        monkeypatch.setenv("TORCH_NUM_THREADS", "1")  # the user's count wins
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
        choice = threads.configure_threads()
        assert torch.get_num_threads() == choice.torch == 1
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    finally:
        torch.set_num_threads(before)
        for pool in blas_before:
            if pool["user_api"] == "blas":
                threadpoolctl.threadpool_limits(pool["num_threads"], user_api="blas")


def test_the_run_summary_prints_the_choice(tmp_path, monkeypatch):
    from rich.console import Console

    from canopy_entropy.config import demo_config_path, load_config
    from canopy_entropy.runner.display import StageResult
    from canopy_entropy.runner.summary import print_summary

    choice = choose_threads({"OMP_NUM_THREADS": "1"}, 2)
    monkeypatch.setattr(threads, "_applied", choice)
    console = Console(file=io.StringIO(), width=200)
    cfg = load_config(demo_config_path(), check_models=False)
    print_summary(console, tmp_path, cfg, [StageResult("metrics", "done", "", 1.0)])
    lines = console.file.getvalue().splitlines()
    want = (
        "threads: torch 1 (OMP_NUM_THREADS), BLAS 1 (OMP_NUM_THREADS), tokenizers pool off; "
        "2 physical cores available"
    )
    assert lines.count(want) == 1
