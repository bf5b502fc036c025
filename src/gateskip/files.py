"""Writing outputs so that no work is lost: every file goes to a temporary name beside its target
and is renamed onto it once complete, and updates of a shared file happen under a lock.

- `atomic_path` / `write_text` / `write_json`: a reader, an interruption or a full disk never
  leaves a half-written file under the real name (the temporary file is removed instead), and a
  replaced file keeps its mode (a new one gets the umask's, not mkstemp's 0600).
- `atomic_folder`: a whole output folder (a saved model) written beside its target first; its
  files are moved in with config.json last, so a folder never holds a config without weights.
- `locked`: an exclusive lock (fcntl.flock on the file's folder) around a read-modify-write of a
  file several commands may update at once (a gate file: gateskip.core.model.update_gate_file).

A failed write is a GateSkipError naming the file (one `error:` line from the CLI). The checks that
an output can be written at all, made before any work starts, are gateskip.validate's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import GateSkipError

try:  # POSIX; elsewhere updates are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

try:  # safetensors reports its own I/O failures (a full disk) as SafetensorError, not OSError
    from safetensors import SafetensorError

    WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, SafetensorError)
except ImportError:  # pragma: no cover
    WRITE_ERRORS = (OSError,)

# Written last when a folder's files are moved into place: they make a folder "a model".
LAST = ("config.json", "gateskip.safetensors", "adapter_config.json")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which for a moment would give files other threads create a umask of 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _umask_mode(full: int) -> int:
    return full & ~_umask()


def _mode_for(target: Path, folder: bool = False) -> int:
    """The mode a file written to `target` should have: that of the file it replaces, else the umask's."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return _umask_mode(0o777 if folder else 0o666)


def _failed(path: Path, e: BaseException) -> GateSkipError:
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return GateSkipError(f"could not write {path}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that read the format from the name
    work) to write the whole file to. When the block ends without error it is renamed onto `path`,
    with the mode of the file it replaces; otherwise it is removed and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _failed(path, e) from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except WRITE_ERRORS as e:  # ENOSPC, EDQUOT, EROFS, EPERM ...: the target is untouched
        raise _failed(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs) -> Path:
    return write_text(path, json.dumps(data, **dump_kwargs))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary folder beside `path` to write a whole output folder into. When the block ends
    without error, a new `path` is the temporary folder renamed; into an existing one its files are
    moved one by one (each an atomic rename), config.json and gate files last, so `path` never holds
    a config without the weights it names. On error the temporary folder is removed.

    stale: glob patterns of files in an existing `path` that belong to what is replaced (a saved
    model's weight shards and their index): those the new folder does not have are removed before
    config.json moves in, as save_pretrained cleans a folder it saves into."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _failed(path, e) from None
    try:
        yield tmp
        if not path.exists():
            os.chmod(tmp, _mode_for(path, folder=True))
            os.replace(tmp, path)
        else:
            files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name in LAST, str(p)))
            new = {f.relative_to(tmp) for f in files}
            old = {p for pattern in stale for p in path.glob(pattern) if p.is_file() and p.relative_to(path) not in new}
            for f in files:
                if f.name in LAST:  # the old weights leave before the config that names the new ones arrives
                    for gone in old:
                        gone.unlink(missing_ok=True)
                    old = set()
                dest = path / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(f, _mode_for(dest))
                os.replace(f, dest)
            for gone in old:
                gone.unlink(missing_ok=True)
    except WRITE_ERRORS as e:
        raise _failed(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What a saved model's weights are: removed from a folder a new model replaces (atomic_folder's stale).
MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock for updating `path`: fcntl.flock on the folder holding it (a lock on the
    file itself would not survive the rename that replaces it, and a sidecar lock file would be
    clutter beside every gate file). Blocks while another process holds it."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError as e:
        raise GateSkipError(f"cannot lock {path} for writing: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """matplotlib's savefig through `atomic_path` (a full disk leaves no truncated image); the
    figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)
    return Path(path)
