"""The run display's throughput and ETA: measured after warm-up, with an injected clock."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from rich.console import Console

from canopy_entropy.runner.display import RunDisplay, StageResult, ThroughputEstimator


class Clock:
    """A clock the test moves by hand (no wall-clock dependence)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _display(clock: Clock, models=("a",), tasks=("math",), per_task: int = 12) -> RunDisplay:
    cfg = SimpleNamespace(
        name="t",
        tasks=list(tasks),
        models=[SimpleNamespace(label=m, variant="base") for m in models],
    )
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    d = RunDisplay(cfg, console, clock=clock)
    for m in models:
        for t in tasks:
            d.totals[(m, t)], d.done[(m, t)] = per_task, 0
    return d


def _simulate(load_s: float, first_s: float, steps: np.ndarray, tokens: np.ndarray):
    """Event times of a process: loading, a slow first prompt, then ``steps`` seconds each."""
    durations = np.concatenate([[load_s + first_s], steps])
    return np.cumsum(durations), np.cumsum(tokens)


def test_eta_after_the_first_prompt_is_within_a_factor_2_of_the_truth():
    rng = np.random.default_rng(7)
    n = 12
    steps = rng.uniform(4.0, 8.0, n - 1)  # a steady process: 4-8 s per prompt
    tokens = rng.integers(300, 900, n)
    times, cum_tokens = _simulate(load_s=40.0, first_s=30.0, steps=steps, tokens=tokens)
    clock = Clock()
    d = _display(clock, per_task=n)
    shown = []
    for k in range(n):
        clock.now = times[k]
        d.done[("a", "math")] = k + 1
        d.observe("a", int(cum_tokens[k]), k + 1)
        shown.append((d.eta(), d.estimator.eta_seconds(n - k - 1), d.speed()))
    assert shown[0][0] == "estimating…" and "estimating…" in shown[0][2]  # warm-up only
    for k in range(1, n - 1):
        truth = times[-1] - times[k]
        est = shown[k][1]
        assert truth / 2 <= est <= truth * 2, (k, est, truth)
    # what the old estimate (elapsed since the start / prompts done) said after prompt 2
    old = (n - 2) * times[1] / 2
    assert old > 2 * (times[-1] - times[1])  # it included loading and the first prefill
    # tokens/s: the tokens generated after warm-up over the time they took, exactly
    k = n - 1
    want = (cum_tokens[k] - cum_tokens[0]) / (times[k] - times[0])
    assert d.estimator.tokens_per_s() == want
    assert d.speed() == f"{want:,.0f} tokens/s · ETA 0.0s"


def test_estimating_until_a_few_seconds_of_decoding():
    est = ThroughputEstimator(min_prompts=1, min_seconds=3.0)
    est.observe(100.0, 50, 1)  # warm-up end
    for k in range(1, 6):  # 0.5 s per prompt: 2.5 s measured after 5 prompts
        est.observe(100.0 + 0.5 * k, 50 + 10 * k, 1 + k)
        assert est.eta_seconds(10) is None and est.tokens_per_s() is None
    est.observe(103.0, 110, 7)
    assert est.eta_seconds(10) == 10 * 3.0 / 6 and est.tokens_per_s() == 60 / 3.0
    assert est.eta_seconds(0) == 0.0


def test_a_new_model_warms_up_again_and_then_uses_its_own_rate():
    clock = Clock()
    d = _display(clock, models=("a", "b"), per_task=4)
    # model a: loads, then 5 s per prompt with 100 tokens each
    for k, t in enumerate([30.0, 35.0, 40.0, 45.0]):
        clock.now = t
        d.done[("a", "math")] = k + 1
        d.observe("a", 100 * (k + 1), k + 1)
    assert d.estimator.eta_seconds(4) == 4 * 5.0
    # model b: its first prompt (loading, 60 s) is not a sample; a's rate stands meanwhile
    clock.now = 105.0
    d.done[("b", "math")] = 1
    d.observe("b", 10, 1)
    assert d.estimator.eta_seconds(3) == 3 * 5.0 and d.estimator.tokens_per_s() == 300 / 15.0
    # then b's own pace (20 s per prompt, 40 tokens) once it has a prompt and 3 s measured
    clock.now = 125.0
    d.done[("b", "math")] = 2
    d.observe("b", 50, 2)
    assert d.estimator.eta_seconds(2) == 2 * 20.0 and d.estimator.tokens_per_s() == 40 / 20.0
    assert d.eta() == "40s"


def test_log_has_one_line_per_stage_with_its_time():
    clock = Clock()
    d = _display(clock)
    with d.running():
        d.set_stage("metrics")
        d.add_result(StageResult("metrics", "done", "", 3.25))
        d.set_stage("embed")
        d.add_result(StageResult("embed", "skipped", "up to date"))
        d.add_result(StageResult("generate", "done", "3 prompts sampled", 754.0))
    lines = d.console.file.getvalue().splitlines()
    assert lines == [
        "stage metrics   done (3.2s)",
        "stage embed     skipped: up to date",
        "stage generate  done (00:12:34): 3 prompts sampled",
    ]


def test_live_view_says_estimating_then_the_measured_speed():
    clock = Clock()
    d = _display(clock, per_task=3)
    d.console = Console(file=io.StringIO(), force_terminal=True, width=120)
    d.set_stage("generate")
    clock.now = 50.0
    d.done[("a", "math")] = 1
    d.observe("a", 400, 1)
    first = d.console.file.getvalue()
    d.console.print(d.render())
    assert "estimating…" in d.console.file.getvalue()[len(first) :]
    clock.now = 54.0
    d.done[("a", "math")] = 2
    d.observe("a", 800, 2)
    d.console.print(d.render())
    assert "100 tokens/s · ETA 4.0s" in d.console.file.getvalue()


def _warning_child(run_dir, model_label, writer, progress):
    """A generation child that leaves a library note and finishes."""
    import warnings

    from canopy_entropy.errors import Notice

    warnings.warn("converted the model once in 1.0 s", Notice, stacklevel=1)
    warnings.warn("something to look at", stacklevel=1)
    return "summary"


def test_a_childs_warning_reaches_the_parent_as_a_warning(tmp_path):
    """The per-model child's ``warnings.warn`` notes are raised again in the parent, so the CLI
    prints them as its one-line ``warning:`` (not the child's raw ``file:line: UserWarning``)."""
    import warnings

    from canopy_entropy.runner.generation import generate_in_child

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, peak, pid = generate_in_child(
            _warning_child, {"run_dir": tmp_path, "model_label": "m"}, progress=lambda e: None
        )
    assert summary == "summary" and peak > 0 and pid > 0
    from canopy_entropy.cli.main import _show_warning
    from canopy_entropy.errors import Notice

    assert [(str(w.message), w.category) for w in caught] == [
        ("converted the model once in 1.0 s", Notice),
        ("something to look at", UserWarning),
    ]
    out = io.StringIO()
    for w in caught:  # what the CLI prints for them
        _show_warning(w.message, w.category, w.filename, w.lineno, file=out)
    assert out.getvalue().splitlines() == [
        "note: converted the model once in 1.0 s",
        "warning: something to look at",
    ]
