"""Running code a model wrote: a separate process with a wall-clock limit, a memory limit, no network, a
temporary working directory and nothing inherited that it could damage.

Layers, each of which alone stops a class of harm:
    process     a fresh ``python -I`` (isolated: no user site, no PYTHON* variables, the script's directory
                not on the path) in its own session, so a timeout kills the whole process group; an empty
                environment but for PATH, HOME and TMPDIR pointing into the temporary directory; stdin closed
    limits      set by the child on itself before the code runs (``resource``): address space (a huge
                allocation raises MemoryError), CPU seconds, size of any file written, open files, no core
                dumps; the parent's wall clock covers sleeping and blocking
    network     a new network namespace where the kernel allows one (only a loopback that is down); where it
                does not, the audit hook below refuses every socket connect, bind and send
    audit hook  ``sys.addaudithook`` (PEP 578), installed before the code is compiled: refuses process creation
                (fork, exec, spawn, system, subprocess), loading or calling native code through ctypes,
                signals to other processes, and any write, rename, delete, link or permission change outside
                the temporary directory. A refused action raises PermissionError inside the code, which then
                usually fails its asserts or exits non-zero.

Outcomes are one of ``STATUSES``: ok (exit 0), failed (non-zero exit: an assert, an exception), timeout,
memory (MemoryError or killed for memory), blocked (the audit hook refused something), crashed (killed by a
signal). Only ``ok`` earns a reward; every status is counted in the RL metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from frugallm.errors import ConfigError

STATUSES = ("ok", "failed", "timeout", "memory", "blocked", "crashed")
BLOCKED_MARK = "frugallm-sandbox: blocked "

# The child's first code: limits, namespace, audit hook, then the user's code. Written by this module; it
# reads its settings from argv so that nothing of the parent's state is pickled across.
_GUARD = r'''
import os, resource, sys
settings = __import__("json").loads(sys.argv[1])
root = os.path.realpath(settings["root"])
for name, value in (("RLIMIT_AS", settings["memory_bytes"]), ("RLIMIT_CPU", settings["cpu_s"]),
                    ("RLIMIT_FSIZE", settings["file_bytes"]), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
try:  # a private network namespace: no interface but a loopback that is down
    import ctypes
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
except Exception:
    pass
MARK = settings["mark"]
NO_ARGS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
           "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto",
           "socket.sendmsg", "socket.getaddrinfo", "os.startfile", "pty.spawn", "sys.setprofile", "sys.settrace",
           "os.setuid", "os.setgid", "os.chroot", "os.putenv", "os.unsetenv", "winreg.OpenKey"}
PATH_ARGS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.mkdir": (0,),
             "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,),
             "os.utime": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (0, 1),
             "os.chflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
def inside(path):
    if isinstance(path, int):  # a file descriptor the code already holds
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == root or p.startswith(root + os.sep)
def refuse(what):
    sys.stderr.write(MARK + what + "\n")
    raise PermissionError("sandbox: " + what)
def hook(event, args):
    if event in NO_ARGS:
        refuse(event)
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1] or "", args[2] or 0
        writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT |
                                                                   os.O_APPEND | os.O_TRUNC)
        if writing and path is not None and not inside(path):
            refuse("write outside the sandbox: " + str(path))
    elif event in PATH_ARGS:
        for i in PATH_ARGS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                refuse(event + " outside the sandbox: " + str(args[i]))
code = open(os.path.join(root, "main.py"), encoding="utf-8").read()
del settings
sys.addaudithook(hook)
sys.argv = ["main.py"]
exec(compile(code, "main.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(kw_only=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock, from start to kill
    memory_bytes: int = 512 * 2**20  # address space of the child (the interpreter itself needs ~30 MB)
    file_bytes: int = 2**20  # the largest file it may write
    output_bytes: int = 64 * 2**10  # stdout/stderr kept for the caller

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"sandbox timeout_s must be > 0, got {self.timeout_s!r}")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < 64 * 2**20:
            raise ConfigError(f"sandbox memory_bytes must be an integer >= 64 MiB, got {self.memory_bytes!r}")


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python script under the sandbox (module doc); never raises for what the code does."""
    limits = limits or SandboxLimits()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="frugallm-sandbox-") as tmp:
        root = Path(tmp).resolve()
        (root / "main.py").write_text(code, encoding="utf-8")
        settings = {"root": str(root), "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                    "cpu_s": max(1, int(limits.timeout_s) + 1), "mark": BLOCKED_MARK}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "TMPDIR": str(root), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _GUARD, json.dumps(settings)], cwd=root, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        _kill_group(proc)  # anything it left behind in its session
    stdout = out[: limits.output_bytes].decode("utf-8", "replace")
    stderr = err[-limits.output_bytes:].decode("utf-8", "replace")
    return SandboxResult(_status(proc.returncode, stderr, timed_out), proc.returncode, stdout, stderr,
                         time.perf_counter() - t0)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(returncode: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if BLOCKED_MARK in stderr:
        return "blocked"
    if "MemoryError" in stderr:
        return "memory"
    if returncode == 0:
        return "ok"
    if returncode is not None and returncode < 0:
        # SIGXCPU: over the CPU limit, which a wall-clock timeout would have caught a little later
        return "timeout" if -returncode == signal.SIGXCPU else ("memory" if -returncode == signal.SIGKILL else "crashed")
    return "failed"


def run_many(codes: list[str], limits: SandboxLimits | None = None, workers: int = 4) -> list[SandboxResult]:
    """``run_python`` over many programs, ``workers`` at a time, so that a batch of timeouts costs about
    len(codes) / workers limits rather than len(codes)."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(codes)))) as pool:
        return list(pool.map(lambda c: run_python(c, limits), codes))


__all__ = ["STATUSES", "SandboxLimits", "SandboxResult", "run_many", "run_python"]
