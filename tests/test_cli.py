"""The ``canopy`` command itself: lazy commands, exit codes, one-line errors, readable help."""

from __future__ import annotations

import errno
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import canopy_entropy
from canopy_entropy.cli.main import COMMANDS
from cli_helpers import run_cli

SRC = Path(canopy_entropy.__file__).parents[1]
HEAVY = ("torch", "transformers", "scipy", "pandas", "matplotlib", "pyarrow")


def canopy(*args: str, importtime: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``python -m canopy_entropy ARGS`` in a fresh interpreter (this checkout's sources)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "COLUMNS": "100",
        **env,
    }
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "canopy_entropy", *args],
        capture_output=True,
        text=True,
        env=full_env,
    )


def imported(stderr: str) -> set[str]:
    """Module names listed by ``-X importtime`` (lines 'import time: self | cumulative | name')."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name)
    return names


def heavy_in(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def plain(text: str) -> str:
    """Help text without rich's box drawing, whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_importtime_parser_sees_heavy_modules():
    """The check below can fail: the same parser finds pyarrow when it is imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pyarrow"],
        capture_output=True,
        text=True,
    )
    assert "pyarrow" in heavy_in(imported(proc.stderr))


def test_top_level_help_imports_nothing_heavy_and_lists_every_command():
    proc = canopy("--help", importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = imported(proc.stderr)
    assert "canopy_entropy.cli.main" in names  # the parse really saw this run's imports
    assert heavy_in(names) == []
    assert not {f"canopy_entropy.cli.{m}" for m, _ in COMMANDS.values()} & names
    text = plain(proc.stdout)
    for name, (_, summary) in COMMANDS.items():
        assert f"{name} {summary}" in text
    assert "Exit codes: 0 success; 1 a stage or command failed" in text
    assert "2 a user error" in text and "130 interrupted" in text
    assert "--version" in text and "<bool>" not in text


def test_version_imports_nothing_heavy():
    proc = canopy("--version", importtime=True)
    assert proc.returncode == 0
    assert proc.stdout == f"canopy-entropy {canopy_entropy.__version__}\n"
    assert heavy_in(imported(proc.stderr)) == []


def test_summaries_are_the_commands_docstrings():
    for name, (module, summary) in COMMANDS.items():
        command = importlib.import_module(f"canopy_entropy.cli.{module}").command
        assert command.__doc__.strip().splitlines()[0] == summary, name


def test_metrics_default_grouping_is_the_library_default():
    from canopy_entropy.cli import metrics as cli_metrics
    from canopy_entropy.metrics import DEFAULT_BY

    assert cli_metrics.DEFAULT_BY == ",".join(DEFAULT_BY)


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "import"])
def test_command_help_is_light_and_readable(name):
    """Each command's help: no heavy import, no value hint on flags, no internal document."""
    proc = canopy(name, "--help", importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert heavy_in(imported(proc.stderr)) == []
    assert "<bool>" not in proc.stdout and "SPEC" not in proc.stdout
    assert "docs/" in proc.stdout  # points to the repository's own documentation
    assert "…" not in proc.stdout  # nothing cut


def test_run_help_lists_every_stage_in_run_order():
    from canopy_entropy.config import STAGES

    text = plain(canopy("run", "--help").stdout)
    assert ", ".join(STAGES) in text
    assert list(STAGES) == [
        "generate", "embed", "semantic-entropy", "metrics", "score", "tables", "compare",
        "regress", "reward", "plots", "report",
    ]  # fmt: skip


def test_generate_help_shows_defaults():
    text = plain(canopy("generate", "--help").stdout)
    assert "--top-k <int> Keep the k most likely tokens (0 = off). [default: 0]" in text
    assert "--variant <str> base (raw text) or instruct (chat template). [default: (the" in text
    assert "--common-random-numbers Same random streams" in text  # a flag: no type column


def test_misspelled_command_suggests_the_closest_without_heavy_imports():
    proc = canopy("metric", "runs/x", importtime=True)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert errors == ["error: no command 'metric'; did you mean 'metrics'?"]
    assert heavy_in(imported(proc.stderr)) == []
    assert canopy("gen").stderr.strip() == "error: no command 'gen'; did you mean 'generate'?"
    assert "did you mean 'run' or 'reward' or 'regress' or 'report'?" in canopy("r").stderr
    far = canopy("xyzzy")
    assert far.returncode == 2
    assert far.stderr.strip() == ("error: no command 'xyzzy'; use one of " + ", ".join(COMMANDS))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--bogus"], "error: No such option: --bogus"),
        (["metrics", ".", "--delta", "abc"], "error: Invalid value for '--delta'"),
        (["metrics"], "error: Missing argument 'run'; see 'canopy metrics --help'"),
        (["run", "--stages", "metrix"], "error: unknown stage 'metrix' in --stages; did you"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    proc = canopy(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bare_canopy_prints_help_and_exits_2():
    proc = canopy()
    assert proc.returncode == 2
    assert "Commands" in proc.stdout and "Exit codes" in proc.stdout


TINY = """\
name = "failing"
tasks = ["math"]

[[models]]
model = "{model}"
variant = "base"
label = "tiny-base"

[prompts]
n = 1

[generation]
rollouts = 2
max_new_tokens = 6

[engine]
device = "cpu"
dtype = "float32"

[embed]
encoder = "{encoder}"
"""


def test_failed_stage_exits_1_and_success_exits_0(tmp_path):
    """A real ``canopy run`` whose embed stage fails (no such encoder) exits 1, not 0."""
    from canopy_entropy.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-model")
    config = tmp_path / "tiny.toml"
    missing = tmp_path / "no-such-encoder"
    config.write_text(TINY.format(model=model, encoder=missing))
    run = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = canopy("run", str(config), "--out", str(run), "--stages", "generate,embed", **env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [" ".join(ln.split()) for ln in proc.stdout.splitlines()]
    assert any(ln.startswith("embed failed") for ln in lines), proc.stdout
    assert any(ln.startswith("generate done") for ln in lines), proc.stdout
    assert list((run / "rollouts").rglob("*.parquet"))  # generation did its work
    again = canopy("run", str(config), "--out", str(run), "--stages", "generate", **env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "all rollouts already in the store" in again.stdout


def test_path_through_a_file_is_one_line_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    code, _, err = run_cli(["run", "--stages", "tables", "--out", str(out)], capsys, monkeypatch)
    assert code == 2
    assert " ".join(err.split()) == (
        f"error: '{out}': Not a directory; a part of the path is a file, not a folder; "
        "check the path"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line_error(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, _, err = run_cli(
            ["run", "--stages", "tables", "--out", str(locked / "run")], capsys, monkeypatch
        )
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert "Permission denied" in err and str(locked / "run") in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/rollouts/x.parquet"),
            "error: '/data/run/rollouts/x.parquet': No space left on device; the disk is full; "
            "free some space and run the command again",
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/r", None, "/data/s"),
            "error: '/data/r' -> '/data/s': Permission denied; check its permissions or choose "
            "a folder you can write to",
        ),
        (
            OSError(errno.EIO, os.strerror(errno.EIO), Path("/data/run/x.parquet")),
            f"error: '/data/run/x.parquet': {os.strerror(errno.EIO)}; check the path and try again",
        ),
        (TimeoutError("timed out"), "error: timed out"),
    ],
)
def test_os_errors_become_one_line(exc, want, capsys, monkeypatch):
    import canopy_entropy.config

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(canopy_entropy.config, "load_config", fail)
    code, _, err = run_cli(["run"], capsys, monkeypatch)
    assert code == 2 and " ".join(err.split()) == want


def canopy_run_with(load_config_body: str) -> subprocess.CompletedProcess:
    """``canopy run`` in a fresh interpreter whose config loader runs ``load_config_body``."""
    script = (
        "import os, signal, sys, canopy_entropy.config as c\n"
        "def patched(*a, **k):\n"
        f"    {load_config_body}\n"
        "c.load_config = patched\n"
        "sys.argv = ['canopy', 'run']\n"
        "from canopy_entropy.cli.main import main\n"
        "main()\n"
    )
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_ctrl_c_exits_130():
    proc = canopy_run_with(
        "os.kill(os.getpid(), signal.SIGINT); sys.exit('SIGINT was not delivered')"
    )
    assert proc.returncode == 130
    assert proc.stderr.strip() == "interrupted"


def test_a_bug_keeps_its_traceback_and_exits_1():
    proc = canopy_run_with("return {}['missing']")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().endswith("KeyError: 'missing'")
    assert "error:" not in proc.stderr


def test_generate_rejects_negative_top_k(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        ["generate", "--model", "x", "--prompts", "math", "--run", str(tmp_path), "--top-k", "-1"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "--top-k must be >= 0 (0 = off), got -1" in err
