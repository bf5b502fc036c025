"""Run untrusted Python programs (model-written code plus its tests), one process each.

Code benchmarks (HumanEval, MBPP) score a model by executing what it wrote, so a wrong or
hostile program must not hang the evaluation, eat the machine's memory, reach the network, or
damage files. Each program runs as `python -I -B` (no user site, no PYTHON* variables, no
bytecode written) with a minimal environment, in a fresh scratch directory that is its cwd,
HOME and TMPDIR and is removed afterwards, under:

- a wall-clock limit: the whole process group is killed with SIGKILL when it runs out;
- a memory limit (RLIMIT_AS), a file-size limit (RLIMIT_FSIZE: also bounds what it prints,
  since its output goes to files), a CPU-time backstop (RLIMIT_CPU) and no core dumps;
- no network: where `unshare` can make namespaces (probed once; unprivileged user namespaces
  are enough), it runs in a new user + network namespace, which has only a loopback interface
  that is down, so no connection leaves it whatever the program does (ctypes, other binaries);
  in a new PID namespace too, so every process it starts dies with it, and with a process-count
  limit (RLIMIT_NPROC, counted inside its user namespace). Without namespaces only the
  in-process guard below stands between the program and the network;
- an in-process guard, set up before the program runs: Python's socket classes refuse every
  address family but AF_UNIX; deleting, renaming, truncating, chmod/chown and opening for
  writing (os.*, open, io.open, hence pathlib, shutil and tempfile) are refused outside the
  scratch directory; starting programs or processes (os.system/fork/exec*/spawn*, subprocess),
  signalling processes, os._exit and changing user ids are refused altogether (the idea of
  OpenAI human-eval's `reliability_guard`, narrowed so the standard library keeps working).

What it does NOT stop (it guards against accidents and model mistakes; it is not a security
boundary against a program written to escape):
- the filesystem is not isolated: the program can read every file the user can, and the
  write guard is Python code it can get around (`import posix`, ctypes, the `_io` module,
  os.link/symlink/mkdir, which are not guarded);
- the same holds for the socket guard, so without a namespace the network is blocked only for
  programs that use Python's socket API; and Unix-domain sockets on the filesystem (a Docker
  or X11 socket the user can open) stay reachable even inside the network namespace;
- RLIMIT_NPROC is not enforced for root, and not set without a user namespace (it would count
  all of the user's processes there); without a PID namespace a program that calls setsid()
  can leave processes behind the process-group kill (they still meet RLIMIT_CPU);
- a program that ends its own process with status 0 before its tests run (posix._exit(0),
  ctypes) is scored as passed; SystemExit(0) is caught and scored as failed;
- disk use beyond the per-file size limit, open files and CPU cores are not limited.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PASSED, FAILED, TIMEOUT, MEMORY, ERROR = "passed", "failed", "timeout", "memory", "error"
FILE_LIMIT_MB = 64
PROCESS_LIMIT = 64
_MEMORY_RC = 117  # the runner's exit code for MemoryError
_EARLY_EXIT_RC = 118  # the runner's exit code for SystemExit(0) before the program's end
_DETAIL_CHARS = 600

# Executed by `python -I -B -c` in the child: the limits, then the guard, then the program itself
# (compiled from program.py in the scratch directory, its cwd, so tracebacks show its lines).
_RUNNER = r"""
import builtins, errno, os, resource, sys
program, memory, fsize, nproc, cpu = sys.argv[1], *map(int, sys.argv[2:6])

def _limit(kind, value):
    if value < 0:
        return
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))

_limit(resource.RLIMIT_AS, memory)
_limit(resource.RLIMIT_FSIZE, fsize)
_limit(resource.RLIMIT_NPROC, nproc)
_limit(resource.RLIMIT_CPU, cpu)
_limit(resource.RLIMIT_CORE, 0)

import socket, _socket
def _refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "disabled in the gateskip sandbox")
def _refuse_network(*args, **kwargs):
    raise PermissionError(errno.EACCES, "network access is disabled in the gateskip sandbox")
def _check_family(family, fileno):
    if fileno is None and (socket.AF_INET if family == -1 else family) != getattr(socket, "AF_UNIX", None):
        _refuse_network()
_socket_init = socket.socket.__init__  # calls _socket.socket.__init__, looked up at call time
_raw_socket = _socket.socket
def _guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
    _check_family(family, fileno)
    _socket_init(self, family, type, proto, fileno)
socket.socket.__init__ = _guarded_init
class _GuardedSocket(_raw_socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        _check_family(family, fileno)
        _raw_socket.__init__(self, family, type, proto, fileno)
_socket.socket = _socket.SocketType = _GuardedSocket
socket.create_connection = socket.create_server = _refuse_network

import io, subprocess
_exit = os._exit
for name in ("system", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "execl",
             "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen", "chroot", "setuid", "setgid",
             "seteuid", "setegid", "setreuid", "setregid", "_exit"):
    if hasattr(os, name):
        setattr(os, name, _refuse)
subprocess.Popen = _refuse
for name in ("call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, _refuse)

# Files: deleting, renaming, truncating, re-permissioning and opening for writing only inside the
# scratch directory (tempfile, shutil.rmtree and friends go through these and keep working there).
_scratch = os.path.realpath(os.getcwd())
_getcwd, _readlink, _realpath, _join, _split = os.getcwd, os.readlink, os.path.realpath, os.path.join, os.path.split
def _inside(path, dir_fd=None, follow=True):
    if isinstance(path, int):
        return True  # a descriptor it already holds
    path = os.fsdecode(os.fspath(path))
    base = _readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else _getcwd()
    full = _join(base, path)
    if not follow:  # the entry itself (unlink, rename): judge where it lies, not where a link points
        head, tail = _split(full.rstrip("/"))
        full = _join(_realpath(head), tail)
    full = _realpath(full) if follow else full
    return full == _scratch or full.startswith(_scratch + "/")
def _confine(name, *, follow=True, paths=(("path", "dir_fd"),)):
    original = getattr(os, name, None)
    if original is None:
        return
    def confined(*args, **kwargs):
        for i, (key, fd_key) in enumerate(paths):
            path = args[i] if i < len(args) else kwargs.get(key)
            if path is not None and not _inside(path, kwargs.get(fd_key), follow):
                raise PermissionError(errno.EACCES, f"{name} outside the gateskip sandbox's scratch directory", path)
        return original(*args, **kwargs)
    setattr(os, name, confined)
for name in ("remove", "unlink", "rmdir"):
    _confine(name, follow=False)
for name in ("rename", "replace"):
    _confine(name, follow=False, paths=(("src", "src_dir_fd"), ("dst", "dst_dir_fd")))
for name in ("truncate", "chmod", "chown", "lchown", "utime"):
    _confine(name)
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE and not _inside(path, dir_fd):
        raise PermissionError(errno.EACCES, "writing outside the gateskip sandbox's scratch directory", path)
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = _guarded_os_open
_io_open = io.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(errno.EACCES, "writing outside the gateskip sandbox's scratch directory", file)
    return _io_open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

with _io_open(program, encoding="utf-8") as f:
    code = compile(f.read(), program, "exec")
namespace = {"__name__": "__main__", "__file__": program, "__builtins__": builtins}
del f, name
try:
    exec(code, namespace)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program exited with status 0 before its end (its tests did not all run)\n")
    sys.stderr.flush()
    _exit(%(early)d)
except MemoryError:
    namespace.clear()
    try:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        _exit(%(memory)d)
""" % {"early": _EARLY_EXIT_RC, "memory": _MEMORY_RC}


@dataclass
class Outcome:
    """How one program ended. status: "passed" (ran to its end, exit status 0), "failed" (an
    exception, a failed assert, a non-zero exit or a signal), "timeout", "memory" (MemoryError
    under the memory limit) or "error" (the sandbox itself could not run it); detail: the end
    of its error output or the reason, for reading failures."""

    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASSED


_NAMESPACE_CANDIDATES = (
    ("-r", "-n", "--pid", "--fork", "--kill-child"),  # unprivileged: user + network + PID namespaces
    ("-n", "--pid", "--fork", "--kill-child"),  # root where user namespaces are off
    ("-r", "-n"),
    ("-n",),
)


@functools.lru_cache(maxsize=1)
def _namespace_flags() -> tuple[str, ...] | None:
    """The first `unshare` flag set that works on this machine (probed once), or None."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    for flags in _NAMESPACE_CANDIDATES:
        try:
            probe = subprocess.run([unshare, *flags, "--", "true"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return (unshare, *flags, "--")
    return None


def network_isolation() -> str:
    """How programs are kept off the network here: "namespace" (their own network namespace: no
    network at all) or "guard" (only the in-process socket guard; see the module docstring)."""
    return "namespace" if _namespace_flags() is not None else "guard"


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * _DETAIL_CHARS))
            text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text[-_DETAIL_CHARS:]


def _child_env(scratch: Path) -> dict[str, str]:
    """A minimal environment: nothing of the caller's (tokens, proxies, CUDA settings) leaks in,
    and numerical libraries start one thread each so the address-space limit is not spent on
    per-thread buffers."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch),
           "TMP": str(scratch), "TEMP": str(scratch), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[name] = "1"
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `source` as a Python program in its own sandboxed process (see the module docstring)
    and say how it ended. Never raises for anything the program does."""
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="gateskip-sandbox-"))
    try:
        scratch = root / "work"
        scratch.mkdir()
        program = scratch / "program.py"
        program.write_text(source, encoding="utf-8")
        prefix = _namespace_flags()
        # RLIMIT_NPROC counts per user: only meaningful inside a user namespace of its own.
        nproc = PROCESS_LIMIT if prefix is not None and "-r" in prefix else -1
        limits = [str(memory_mb * 2**20), str(FILE_LIMIT_MB * 2**20), str(nproc), str(int(timeout_s) + 2)]
        command = [*(prefix or ()), sys.executable, "-I", "-B", "-c", _RUNNER, program.name, *limits]  # cwd: scratch
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(command, cwd=scratch, env=_child_env(scratch), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, start_new_session=True, close_fds=True)
            except OSError as e:
                return Outcome(ERROR, f"could not start the sandbox: {e}", time.monotonic() - start)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                return Outcome(TIMEOUT, f"killed after {timeout_s:g} s", time.monotonic() - start)
            finally:
                if proc.returncode is None:  # interrupted (KeyboardInterrupt): leave nothing running
                    _kill_group(proc)
                    proc.wait()
            if prefix is None or "--pid" not in prefix:  # a PID namespace has already taken its processes with it
                _kill_group(proc)  # anything it left running in its process group
        seconds = time.monotonic() - start
        detail = _tail(root / "stderr")
        if code == 0:
            return Outcome(PASSED, "", seconds)
        if code == _MEMORY_RC:
            return Outcome(MEMORY, detail or f"MemoryError under the {memory_mb} MB limit", seconds)
        if code < 0:  # killed by a signal (unshare passes its child's signal on to itself)
            number = -code
            name = _signal_name(number)
            if number == signal.SIGKILL and seconds >= timeout_s:  # RLIMIT_CPU's hard kill
                return Outcome(TIMEOUT, f"killed by {name} (CPU-time limit)", seconds)
            return Outcome(FAILED, f"killed by {name}" + (f"\n{detail}" if detail else ""), seconds)
        return Outcome(FAILED, detail or f"exit status {code}", seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_programs(sources: Sequence[str] | Iterable[str], *, timeout_s: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None, progress: bool = True, desc: str = "tests") -> list[Outcome]:
    """run_program over many programs, in input order, with a progress bar. A few run at a time:
    test programs are CPU-bound, so more workers than cores only slow each one down and risk
    false timeouts."""
    from tqdm.auto import tqdm

    sources = list(sources)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    run = functools.partial(run_program, timeout_s=timeout_s, memory_mb=memory_mb)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(run, sources), total=len(sources), desc=desc, disable=not progress,
                         leave=False))
