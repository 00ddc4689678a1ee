"""Run generated code against a task's unit tests in a separate, limited process.

Opt-in only: model-written code runs on this machine, so nothing runs unless the caller passes
``execute_code=True`` (the experiment config's ``[scoring] execute_code = true``).

What each run guarantees:

* a new process in its own process group, killed as a group (SIGKILL) at the wall-clock limit
  and again when the tests end, so children it leaves behind die with it;
* an address-space limit (``RLIMIT_AS``, soft = hard, so it cannot be raised again), a CPU-time
  limit slightly above the wall-clock limit (it also stops a child that left the process
  group), a 64 MiB file-size limit and no core dumps, inherited by everything it starts;
* output to files (so at most the file-size limit), of which the last 4000 characters return;
* a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
* a clean environment: only ``PATH``, locale, thread-count and Python settings; no proxy
  variables, tokens or keys of the calling process;
* Internet sockets (AF_INET, AF_INET6, raw packets) and host-name lookups refused from Python,
  in the child and in the Python processes it starts with its environment (a
  ``sitecustomize`` module on ``PYTHONPATH``); local Unix sockets (asyncio's self-pipe) still work.

What it does not guarantee: it is not a security sandbox. Code that runs a non-Python program
(``curl``), starts Python with another environment, uses ``ctypes`` or undoes the patch can
reach the network; it can read and write any file the user can; the number of processes it
starts is not limited (a fork bomb is stopped only by the group kill at the deadline). For
untrusted code, run the scoring in a container or VM without network (or ``unshare -rn``).

Test conventions (HumanEval / BigCodeBench style): ``tests`` is Python run after ``program``
in the same ``__main__`` namespace: plain ``assert`` statements, a ``check(candidate)``
function called on ``entry_point``, and/or ``unittest.TestCase`` classes, which the harness
runs (``unittest.main()`` in the tests also works). The tests pass when all of that finishes
without an exception; ``sys.exit`` (even 0) or ``os._exit`` before the end counts as a failure.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from canopy_entropy.errors import CanopyError


class CodeExecutionDisabled(CanopyError):
    """Code scoring was asked for without the opt-in."""


STATUSES = ("passed", "failed", "timeout", "memory")
_MEMORY_EXIT = 113  # the harness's exit status when the code ran out of memory
_TAIL = 4000  # characters of stdout / stderr kept

_GUARD = '''\
"""canopy-entropy code-scoring guard: resource limits and no Internet sockets."""
import resource as _resource
for _limit, _value in {limits!r}:
    _resource.setrlimit(_limit, (_value[0], _value[1]))
import socket as _socket_module
import _socket

def _refuse(*args, **kwargs):
    raise PermissionError(13, "network access is disabled while scoring generated code")

_BLOCKED = {{_socket.AF_INET, _socket.AF_INET6, getattr(_socket, "AF_PACKET", -99)}}
_real_init = _socket.socket.__init__

def _guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
    if fileno is None and (family == -1 or family in _BLOCKED):
        _refuse()
    _real_init(self, family, type, proto, fileno)

# socket.socket.__init__ calls _socket.socket.__init__, so this one class guards both
_socket.socket = _socket.SocketType = type(
    "socket", (_socket.socket,), {{"__init__": _guarded_init, "__module__": "_socket"}}
)
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
              "getnameinfo", "create_connection", "create_server"):
    for _module in (_socket_module, _socket):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse)
'''

_HARNESS = """\
import os, sys, types, unittest
sys.path[0] = os.getcwd()  # the code's own folder, as if it were run as a script
_done, _source = sys.argv[1], open("solution.py", encoding="utf-8").read()
_entry = sys.argv[2] if len(sys.argv) > 2 else None
sys.argv = ["solution.py"]
_results = []

def _unittest_main(*args, **kwargs):
    kwargs["exit"] = False
    kwargs.setdefault("argv", ["solution.py"])
    _results.append(unittest.TestProgram(*args, **kwargs).result.wasSuccessful())

def _main():
    main = types.ModuleType("__main__")
    main.__file__ = "solution.py"
    sys.modules["__main__"] = main
    unittest.main = _unittest_main
    try:
        exec(compile(_source, "solution.py", "exec"), main.__dict__)
        if _entry is not None:
            main.__dict__["check"](main.__dict__[_entry])
        if not _results:
            cases = [
                v for v in list(main.__dict__.values())
                if isinstance(v, type) and issubclass(v, unittest.TestCase)
                and v.__module__ == "__main__"
            ]
            if cases:
                suite = unittest.TestSuite(
                    unittest.defaultTestLoader.loadTestsFromTestCase(c) for c in cases
                )
                _results.append(unittest.TextTestRunner(verbosity=0).run(suite).wasSuccessful())
    except MemoryError:
        sys.stderr.write("MemoryError: the code exceeded its memory limit\\n")
        sys.stderr.flush()
        os._exit({memory_exit})
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if all(_results):
        open(_done, "w").close()

_main()
"""


@dataclass(frozen=True)
class CodeResult:
    """How one program fared: ``status`` is one of STATUSES; output tails for diagnosis."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The program in a model response: the longest fenced block (```python ... ```) when
    the response has one (a response with fences is never valid Python as a whole), else the
    response itself."""
    blocks = [m[2] for m in _FENCE.finditer(response)]
    return max(blocks, key=len) if blocks else response


def _check_limits(timeout_s: float, memory_mb: float) -> None:
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise CanopyError(f"code timeout {timeout_s!r} s is not a positive number of seconds")
    if not (isinstance(memory_mb, (int, float)) and math.isfinite(memory_mb) and memory_mb >= 64):
        raise CanopyError(
            f"code memory limit {memory_mb!r} MiB is too small; give at least 64 MiB "
            "(the Python interpreter itself needs about 30)"
        )


def _environment(workdir: str, guard_dir: str) -> dict[str, str]:
    env = {
        "PATH": os.defpath,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": guard_dir,
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
    }
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"  # BLAS thread pools reserve address space per thread
    return env


def _tail(fh) -> str:
    fh.seek(max(0, os.fstat(fh.fileno()).st_size - _TAIL))
    return fh.read().decode("utf-8", "replace")[-_TAIL:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_code(
    program: str,
    tests: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: float = 1024,
    execute_code: bool = False,
    entry_point: str | None = None,
    python: str | os.PathLike[str] | None = None,
) -> CodeResult:
    """Run ``program`` (its fenced code block, see ``extract_code``) followed by ``tests`` in a
    limited child process (see the module notes).

    ``python`` is the interpreter (default: this one, so the code sees the same packages).
    """
    if execute_code is not True:
        raise CodeExecutionDisabled(
            "code scoring runs model-written code on this machine and is off by default; "
            "enable it with '[scoring] execute_code = true' in the experiment config "
            "(execute_code=True in Python)"
        )
    _check_limits(timeout_s, memory_mb)
    import resource

    memory = int(memory_mb * 1024 * 1024)
    cpu = math.ceil(timeout_s) + 1
    limits = [
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, (64 << 20, 64 << 20)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    with tempfile.TemporaryDirectory(prefix="canopy-code-") as root:
        workdir = os.path.join(root, "work")
        guard_dir = os.path.join(root, "guard")
        os.mkdir(workdir)
        os.mkdir(guard_dir)
        Path(guard_dir, "sitecustomize.py").write_text(_GUARD.format(limits=limits))
        Path(guard_dir, "_canopy_harness.py").write_text(_HARNESS.format(memory_exit=_MEMORY_EXIT))
        source = f"{extract_code(program)}\n\n{tests}\n"
        Path(workdir, "solution.py").write_text(source, encoding="utf-8")
        done = os.path.join(root, f"done-{secrets.token_hex(8)}")
        argv = [str(python or sys.executable), os.path.join(guard_dir, "_canopy_harness.py"), done]
        if entry_point is not None:
            argv.append(entry_point)
        # output goes to files (capped by the file-size limit), never into this process
        with (
            open(os.path.join(root, "stdout"), "w+b") as out,
            open(os.path.join(root, "stderr"), "w+b") as err,
        ):
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=_environment(workdir, guard_dir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            finally:
                _kill_group(proc.pid)
            stdout, stderr = _tail(out), _tail(err)
        code = proc.returncode
        if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif code == _MEMORY_EXIT or (code != 0 and "MemoryError" in stderr):
            status = "memory"
        elif code == 0 and os.path.exists(done):
            status = "passed"
        else:
            status = "failed"
    return CodeResult(status, code, stdout, stderr)


def code_passes(
    program: str,
    tests: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: float = 1024,
    execute_code: bool = False,
    entry_point: str | None = None,
) -> bool:
    """Whether ``program`` passes ``tests`` within the limits (see ``run_code``); a scorer
    ``(response, reference)`` with the tests as the reference. Raises CodeExecutionDisabled
    unless ``execute_code=True``."""
    result = run_code(
        program,
        tests,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        execute_code=execute_code,
        entry_point=entry_point,
    )
    return result.passed
