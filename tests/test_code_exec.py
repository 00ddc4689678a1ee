"""The code scorer: opt-in only, limits enforced, no network, clean environment.

Limits are generous so that a slow, shared machine never fails a test; the assertions are on
what happened (killed, refused, removed), never on how long it took.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.scoring import (
    CodeExecutionDisabled,
    code_passes,
    extract_code,
    run_code,
    score_frame,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process limits")

GENEROUS_S = 60.0  # wall-clock limit for code that should finish


def _run(program: str, tests: str = "", **kwargs):
    kwargs.setdefault("timeout_s", GENEROUS_S)
    return run_code(program, tests, execute_code=True, **kwargs)


def _gone(pid: int) -> bool:
    """The process has exited (no such process, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# ---------------------------------------------------------------------------------------
# opt-in
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [False, None, "yes", 1])
def test_never_runs_without_opt_in(tmp_path, flag):
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').write('ran')"
    with pytest.raises(CodeExecutionDisabled, match=r"\[scoring\] execute_code = true") as info:
        run_code(program, "", execute_code=flag)
    assert isinstance(info.value, CanopyError) and "\n" not in str(info.value)
    with pytest.raises(CodeExecutionDisabled):
        code_passes(program, "")
    assert not marker.exists()
    _run(program)  # the same program does run once enabled: the check above is meaningful
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------
ADD = "def add(a, b):\n    return a + b\n"
UNITTEST = """
import unittest
class TestAdd(unittest.TestCase):
    def test_small(self):
        self.assertEqual(add(1, 2), 3)
    def test_wanted(self):
        self.assertEqual(add(2, 2), {want})
"""


@pytest.mark.parametrize(
    ("program", "tests", "kwargs", "passed"),
    [
        (ADD, "assert add(1, 2) == 3", {}, True),
        (ADD, "assert add(1, 2) == 4", {}, False),
        ("def add(a, b)\n    return a", "assert add(1, 2) == 3", {}, False),  # syntax error
        (
            ADD,
            "def check(candidate):\n    assert candidate(2, 3) == 5",
            {"entry_point": "add"},
            True,
        ),
        (
            ADD,
            "def check(candidate):\n    assert candidate(2, 3) == 6",
            {"entry_point": "add"},
            False,
        ),
        (ADD, "", {"entry_point": "add"}, False),  # no check() to call
        (ADD, UNITTEST.format(want=4), {}, True),  # TestCase classes run by the harness
        (ADD, UNITTEST.format(want=5), {}, False),
        (ADD, UNITTEST.format(want=4) + "unittest.main()", {}, True),
        (ADD, UNITTEST.format(want=5) + "unittest.main()", {}, False),
        (ADD, "import sys\nsys.exit(0)\nassert add(1, 2) == 4", {}, False),  # no skipping
        (ADD, "import os\nos._exit(0)\nassert add(1, 2) == 4", {}, False),
        (f"Sure:\n```python\n{ADD}```\nDone.", "assert add(1, 2) == 3", {}, True),  # fenced
    ],
)
def test_pass_and_fail(program, tests, kwargs, passed):
    result = _run(program, tests, **kwargs)
    assert result.passed is passed, result
    assert result.status == ("passed" if passed else "failed")
    assert code_passes(program, tests, execute_code=True, timeout_s=GENEROUS_S, **kwargs) is passed


def test_extract_code_takes_the_longest_block():
    text = "Use:\n```python\ndef f():\n    return 1\n```\nCall it:\n```\nf()\n```\n"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("x = 1") == "x = 1"


# ---------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------
def test_infinite_loop_and_its_children_are_killed(tmp_path):
    pids = tmp_path / "pids.json"
    program = f"""
import json, os, subprocess, sys
# a sleeping child uses no CPU time: only the process-group kill can end it
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
with open({str(pids)!r}, "w") as fh:
    json.dump([os.getpid(), child.pid], fh)
while True:
    pass
"""
    result = _run(program, timeout_s=3)
    assert result.status == "timeout" and not result.passed
    for pid in json.loads(pids.read_text()):
        deadline = time.monotonic() + GENEROUS_S  # SIGKILL is delivered asynchronously
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), f"process {pid} survived the timeout"


def test_children_left_behind_by_passing_code_are_killed(tmp_path):
    pid_file = tmp_path / "pid"
    program = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
open({str(pid_file)!r}, "w").write(str(child.pid))
"""
    assert _run(program).passed
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + GENEROUS_S
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"process {pid} outlived the run"


def test_memory_hog_is_stopped():
    hog = """
blocks = []
for _ in range(300):  # 3 GB in 10 MB steps, far above the limit
    blocks.append(bytearray(10_000_000))
print("survived")
"""
    result = _run(hog, memory_mb=256)
    assert result.status == "memory" and not result.passed
    assert "survived" not in result.stdout
    assert _run("x = bytearray(2_000_000_000)", memory_mb=256).status == "memory"
    # the same program fits a larger limit: the limit, not the program, stopped it
    assert _run("x = bytearray(100_000_000)", memory_mb=1024).passed


@pytest.mark.parametrize(
    ("timeout_s", "memory_mb"), [(0, 512), (-1, 512), (5, 10), (5, float("nan"))]
)
def test_bad_limits_raise(timeout_s, memory_mb):
    with pytest.raises(CanopyError, match=r"code (timeout|memory)"):
        run_code("pass", "", execute_code=True, timeout_s=timeout_s, memory_mb=memory_mb)


# ---------------------------------------------------------------------------------------
# network, environment, working directory
# ---------------------------------------------------------------------------------------
def test_network_is_refused():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    program = f"""
import socket, _socket, subprocess, sys, urllib.request
attempts = {{
    "create_connection": lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5),
    "socket": lambda: socket.socket().connect(("127.0.0.1", {port})),
    "ipv6_udp": lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
    "raw_module": lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM),
    "dns": lambda: socket.getaddrinfo("localhost", 80),
    "urllib": lambda: urllib.request.urlopen("http://127.0.0.1:{port}/", timeout=5),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "OPEN")
    except OSError as exc:  # urllib wraps the refusal in URLError, an OSError
        print(name, "refused" if "network access is disabled" in str(exc) else repr(exc))
child = "import socket\\ntry:\\n    socket.socket()\\n    print('child OPEN')\\nexcept PermissionError:\\n    print('child refused')"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
a, b = socket.socketpair()  # local Unix sockets still work (asyncio needs them)
a.sendall(b"x")
assert b.recv(1) == b"x"
import asyncio
asyncio.run(asyncio.sleep(0))
"""
    try:
        result = _run(program)
        assert result.passed, result
        lines = dict(line.rsplit(" ", 1) for line in result.stdout.strip().splitlines())
        assert lines == {
            "create_connection": "refused",
            "socket": "refused",
            "ipv6_udp": "refused",
            "raw_module": "refused",
            "dns": "refused",
            "urllib": "refused",
            "child": "refused",
        }
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_clean_environment_and_temporary_workdir(monkeypatch):
    for name in ("HTTPS_PROXY", "http_proxy", "ALL_PROXY", "OPENAI_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, "secret-value")
    program = """
import json, os, sys
open("scratch.txt", "w").write("x")
print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "path0": sys.path[0]}))
"""
    result = _run(program)
    assert result.passed, result
    seen = json.loads(result.stdout)
    assert not [
        k for k in seen["env"] if "PROXY" in k.upper() or k in ("OPENAI_API_KEY", "HF_TOKEN")
    ]
    assert "secret-value" not in json.dumps(seen["env"])
    assert seen["env"]["HOME"] == seen["env"]["TMPDIR"] == seen["cwd"] == seen["path0"]
    assert seen["cwd"] != os.getcwd()
    assert not os.path.exists(seen["cwd"])  # removed with everything written there


def test_score_frame_runs_code_when_enabled():
    frame = pd.DataFrame(
        {
            "text": [ADD, "def add(a, b):\n    return a - b\n", ADD],
            "reference": ["assert add(2, 2) == 4"] * 3,
        }
    )
    out = score_frame(frame, "code_passes", execute_code=True, timeout_s=GENEROUS_S, workers=2)
    assert out["correct"].tolist() == [True, False, True]
    assert "execute_code" not in out["scorer_version"].iloc[0]
    assert '"timeout_s": 60.0' in out["scorer_version"].iloc[0]
