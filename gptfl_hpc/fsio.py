"""Atomic file writing: temp file in the same directory, fsync, rename.

A reader never sees a half-written file under the final name; a killed writer leaves only a
``.tmp-*`` file behind, which is ignored (and overwritten next time).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync and rename it onto `path`."""
    from gptfl_hpc.errors import GptflError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as e:
        raise GptflError(f"writing {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for the group too
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        reason = io_failure(e)
        if reason:  # a full disk, a quota, a read-only file system: one line
            raise GptflError(f"writing {path}: {reason}") from None
        raise


def quiet_hdf5_io_echoes() -> None:
    """After a failed HDF5 write (a full disk), h5py's object destructors repeat the failure as
    "Exception ignored in ... __dealloc__" tracebacks on stderr. The failure itself is raised
    (and reported on one line, `io_failure`); drop only those echoes, pass everything else on."""
    previous, previous_except = sys.unraisablehook, sys.excepthook

    def echo(e: BaseException | None, tb: Any) -> bool:
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        return e is not None and "h5py" in where and io_failure(e) is not None

    def hook(unraisable: Any) -> None:
        if not echo(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    def except_hook(kind: Any, e: BaseException, tb: Any) -> None:  # Cython prints these first
        if not echo(e, tb):
            previous_except(kind, e, tb)

    sys.unraisablehook, sys.excepthook = hook, except_hook


def io_failure(e: BaseException) -> str | None:
    """The operating system's reason when `e` is a failed read or write, else None: an OSError,
    or the RuntimeError HDF5 raises when a write fails on close ("... errno = 28, error message
    = 'No space left on device' ...")."""
    if isinstance(e, OSError):
        return str(e.strerror or e)
    if isinstance(e, RuntimeError):
        m = re.search(r"errno = (\d+)", str(e))
        if m and int(m.group(1)) > 0:
            return os.strerror(int(m.group(1)))
    return None


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The .safetensors serialisation of `tensors`, byte-for-byte deterministic.

    The safetensors library writes its ``__metadata__`` from a hash map, so the same tensors
    and metadata saved twice gave different bytes; here the header is JSON with sorted keys and
    the tensors are laid out in name order, so equal inputs give equal files (``sha256sum``
    compares runs). The format: u64 little-endian header length, the JSON header padded with
    spaces to 8 bytes, then the raw little-endian tensor data.
    """
    import torch

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dt = _ST_DTYPES.get(str(t.dtype).replace("torch.", ""))
        if dt is None:
            raise TypeError(f"safetensors: tensor {name!r} has unsupported dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dt, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def save_safetensors(tensors: dict, path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """torch tensors -> .safetensors, atomically and deterministically (no pickle anywhere)."""
    write_bytes(path, safetensors_bytes(tensors, metadata))


def load_safetensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    from gptfl_hpc.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"checkpoint {path}: not found")
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    return out, meta


# ---------------------------------------------------------------------------------- locking

LOCK_NAME = ".gptfl.lock"
_HELD: dict[str, Any] = {}  # realpath of a lock file -> open file object (this process)


class DirLock:
    """Exclusive lock on a directory that one command writes into (``<dir>/.gptfl.lock``).

    POSIX record locks (``fcntl.lockf``), which Linux implements over NFS (lockd/NFSv4) and which
    Lustre provides when mounted with ``flock``: two gptfl-hpc processes never write the same
    output directory at once. The lock file records who holds it (pid, host, command, start
    time), so the error names the other process. A lock on a directory also covers its
    subdirectories: locking ``runs/demo/gptfl`` fails while another process holds ``runs/demo``.

    ``wait`` > 0 waits up to that many seconds for the holder (used for shared prepared-data
    directories: the second sweep cell waits for the first to finish preparing, then reuses it);
    0 fails at once. On a file system without lock support the lock degrades to the recorded
    owner: refused if that process is alive on this host, with a warning otherwise.
    """

    def __init__(self, directory: str | Path, what: str = "--out", wait: float = 0.0) -> None:
        self.dir = Path(directory)
        self.what = what
        self.wait = wait
        self.path = self.dir / LOCK_NAME
        self._key = ""
        self._file: Any = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        import errno
        import fcntl
        import time

        from gptfl_hpc.errors import GptflError

        if self.dir.exists() and not self.dir.is_dir():
            raise GptflError(f"{self.what} {self.dir}: exists and is not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptflError(f"{self.what} {self.dir}: cannot create it ({e.strerror})") from None
        self._key = os.path.realpath(self.path)
        if self._key in _HELD:  # this process holds it already (a stage inside `run`)
            return
        self._check_ancestors()
        try:
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise GptflError(f"{self.what} {self.dir}: not writable ({e.strerror})") from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    holder = _describe_holder(self.path)
                    f.close()
                    raise GptflError(
                        f"{self.what} {self.dir} is in use by another gptfl-hpc process "
                        f"({holder}); wait for it to finish or use another {self.what}") from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self._no_lock_support(f)
                    break
                f.close()
                raise GptflError(f"{self.what} {self.dir}: cannot lock {self.path} "
                                 f"({e.strerror})") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_me()) + "\n")
        f.flush()
        self._file = f
        _HELD[self._key] = f

    def release(self) -> None:
        f = _HELD.pop(self._key, None) if self._file is not None else None
        if f is not None:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
                f.close()  # closing releases the record lock
        self._file = None

    def _check_ancestors(self) -> None:
        import fcntl

        from gptfl_hpc.errors import GptflError

        for parent in list(self.dir.resolve().parents):
            p = parent / LOCK_NAME
            key = os.path.realpath(p)
            if key in _HELD or not p.is_file():
                continue
            try:
                with open(p, "a+", encoding="utf-8") as g:
                    try:
                        fcntl.lockf(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.lockf(g, fcntl.LOCK_UN)
                    except OSError:
                        raise GptflError(
                            f"{self.what} {self.dir} lies inside {parent}, which another "
                            f"gptfl-hpc process is writing ({_describe_holder(p)}); use "
                            f"another {self.what}") from None
            except OSError:
                continue

    def _no_lock_support(self, f: Any) -> None:
        from gptfl_hpc.errors import GptflError

        owner = _read_owner(self.path)
        if owner and owner.get("host") == _me()["host"] and _pid_alive(owner.get("pid")):
            f.close()
            raise GptflError(f"{self.what} {self.dir} is in use by another gptfl-hpc process "
                             f"({_describe_holder(self.path)}); wait for it or use another "
                             f"{self.what}")
        import logging

        logging.getLogger(__name__).warning(
            "%s: the file system does not support locks; two gptfl-hpc processes writing %s "
            "at once are not detected across hosts", self.path, self.dir)


def _me() -> dict[str, Any]:
    import socket
    import sys
    import time

    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(sys.argv[1:4])[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _describe_holder(path: Path) -> str:
    o = _read_owner(path)
    if not o:
        return f"lock {path}"
    return (f"pid {o.get('pid')} on {o.get('host')}, `{o.get('command')}`, since "
            f"{o.get('since')}")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False
