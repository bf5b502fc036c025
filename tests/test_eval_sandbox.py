"""The sandbox that runs model-written programs: it stops loops, memory hogs and network use, and
tells passing programs from failing ones."""

import os
import socket
import sys
import uuid

import pytest

from gateskip.evaluation import sandbox as S


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_correct_program_passes_and_wrong_one_fails():
    good = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n"
    bad = "def add(a, b):\n    return a * b\n\nassert add(2, 3) == 5\n"
    assert S.run_program(good).status == "passed"
    outcome = S.run_program(bad)
    assert outcome.status == "failed" and outcome.detail.splitlines()[-1] == "AssertionError"


@pytest.mark.parametrize("source, error", [
    ("def f():\n    return 1 / 0\n\nf()\n", "ZeroDivisionError"),
    ("def f(:\n    pass\n", "SyntaxError"),
    ("raise SystemExit(3)\n", "exit status 3"),
    ("import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
])
def test_crashing_program_fails(source, error):
    outcome = S.run_program(source)
    assert outcome.status == "failed" and error in outcome.detail


def test_exit_before_the_tests_is_not_a_pass():
    outcome = S.run_program("import sys\nsys.exit(0)\nassert False\n")
    assert outcome.status == "failed" and "before its end" in outcome.detail


def test_looping_program_is_killed_at_the_time_limit():
    outcome = S.run_program("while True:\n    pass\n", timeout_s=1.0)
    assert outcome.status == "timeout"
    assert outcome.seconds < 5


def test_processes_a_program_starts_die_with_it():
    marker = f"gateskip-test-{uuid.uuid4().hex}"
    child = f"import time; time.sleep(60)  # {marker}"
    source = ("import posix, sys\n"
              "if posix.fork() == 0:\n"  # os.fork and os.exec* are guarded; posix's are not
              f"    posix.execv(sys.executable, [sys.executable, '-c', {child!r}])\n"
              "while True:\n    pass\n")
    outcome = S.run_program(source, timeout_s=1.0)
    left = _processes_with(marker)
    for pid in left:  # started by this test: do not leave it running if the assertion fails
        os.kill(pid, 9)
    assert outcome.status == "timeout" and not left


@pytest.mark.parametrize("source", [
    "x = bytearray(4 * 1024**3)\n",  # one big allocation
    "a = []\nwhile True:\n    a.append(' ' * 10**6)\n",  # growing until it hits the limit
])
def test_memory_hungry_program_is_stopped(source):
    outcome = S.run_program(source, timeout_s=20.0, memory_mb=256)
    assert outcome.status == "memory" and "MemoryError" in outcome.detail
    assert outcome.seconds < 15


def test_endless_output_is_cut_off():
    outcome = S.run_program("while True:\n    print('x' * 1000)\n", timeout_s=20.0)
    assert outcome.status == "failed" and "File too large" in outcome.detail


@pytest.fixture
def listening():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _was_contacted(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_program_cannot_reach_a_listening_socket(listening):
    port = listening.getsockname()[1]
    outcome = S.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n")
    assert outcome.status == "failed"
    assert not _was_contacted(listening)


def test_network_is_refused_even_below_pythons_socket_module(listening):
    """A program that calls libc's socket()/connect() through ctypes bypasses any in-process
    guard; only the network namespace stops it."""
    if S.network_isolation() != "namespace":
        pytest.skip("no unprivileged network namespace on this machine: only the in-process guard applies")
    port = listening.getsockname()[1]
    source = (
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        "assert fd >= 0\n"
        f"addr = struct.pack('=H', socket.AF_INET) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "assert libc.connect(fd, addr, len(addr)) == 0, ctypes.get_errno()\n"
    )
    assert S.run_program(source).status == "failed"
    assert not _was_contacted(listening)


def test_guard_alone_refuses_internet_sockets(monkeypatch):
    monkeypatch.setattr(S, "_namespace_flags", lambda: None)
    outcome = S.run_program("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n")
    assert outcome.status == "failed" and "network access is disabled" in outcome.detail
    local = "import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n"
    assert S.run_program(local).status == "passed"  # AF_UNIX pairs stay usable


def test_program_runs_in_a_scratch_directory_that_is_removed(monkeypatch):
    monkeypatch.setenv("GATESKIP_TEST_SECRET", "do-not-leak")
    made = []
    mkdtemp = S.tempfile.mkdtemp
    monkeypatch.setattr(S.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    source = (
        "import os, shutil, tempfile\n"
        "here = os.getcwd()\n"
        "assert os.listdir(here) == ['program.py'], os.listdir(here)\n"
        "assert os.environ['HOME'] == here and tempfile.gettempdir() == here\n"
        "assert 'GATESKIP_TEST_SECRET' not in os.environ\n"
        "with tempfile.TemporaryDirectory() as d:\n"  # the standard library still works inside it
        "    open(os.path.join(d, 'a'), 'w').write('x')\n"
        "os.makedirs('a/b')\n"
        "open('a/b/c', 'w').write('x')\n"
        "shutil.rmtree('a')\n"
    )
    outcome = S.run_program(source)
    assert outcome.status == "passed", outcome.detail
    assert len(made) == 1 and not os.path.exists(made[0])


@pytest.mark.parametrize("attack", [
    "os.remove({file!r})",
    "open({file!r}, 'w').write('gone')",
    "pathlib.Path({file!r}).write_text('gone')",
    "shutil.rmtree({folder!r})",
    "os.rename({file!r}, 'stolen')",
    "os.chdir({folder!r}); open('keep.txt', 'a').write('more')",
    "os.symlink({file!r}, 'link'); open('link', 'w').write('gone')",
    "os.system('rm -rf ' + {folder!r})",
])
def test_files_outside_the_scratch_directory_are_left_alone(tmp_path, attack):
    folder = tmp_path / "victim"
    folder.mkdir()
    keep = folder / "keep.txt"
    keep.write_text("keep")
    source = "import os, pathlib, shutil\n" + attack.format(file=str(keep), folder=str(folder)) + "\n"
    outcome = S.run_program(source)
    assert outcome.status == "failed" and "PermissionError" in outcome.detail
    assert keep.read_text() == "keep"


def test_run_programs_keeps_the_input_order():
    sources = ["assert True\n", "assert False\n", "pass\n", "1 / 0\n"]
    outcomes = S.run_programs(sources, workers=2, progress=False)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed", "failed"]


def test_sandbox_uses_this_interpreter():
    outcome = S.run_program(f"import sys\nassert sys.version_info[:2] == {tuple(sys.version_info[:2])}\n")
    assert outcome.status == "passed", outcome.detail
