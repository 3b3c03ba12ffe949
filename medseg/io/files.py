"""Writing files so that a reader never sees a partial one, and holding folders against
a second writer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputFileError
from medseg.io.volume import split_suffix

logger = logging.getLogger(__name__)


#: bytes kept free after a hidden name's stem for what follows it (a tag such as
#: ``.in-hand``, or ``.xxxxxxxx.partial.nii.gz``)
_TAIL_BYTES = 40


def _name_limit(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def hidden_stem(path: str | Path) -> str:
    """``.NAME`` for the hidden files medseg keeps beside ``path`` (temporary files,
    markers), shortened where ``NAME`` is so long that ``.NAME`` and a tail of up to
    40 bytes would pass the file system's name limit: then the name is cut and a hash
    of the whole name added (``.NAME-CUT~0123456789ab``), the same for every run."""
    path = Path(path)
    whole = os.fsencode(path.name)
    room = _name_limit(path.parent if path.parent.exists() else Path(".")) - _TAIL_BYTES
    if len(whole) + 1 <= room:
        return f".{path.name}"
    digest = hashlib.sha256(whole).hexdigest()[:12]
    return "." + os.fsdecode(whole[: room - len(digest) - 2]) + "~" + digest


def hidden_sibling(path: str | Path, tail: str) -> Path:
    """The hidden file ``.NAME`` + ``tail`` beside ``path`` (see :func:`hidden_stem`),
    always within the file system's name limit."""
    path = Path(path)
    return path.with_name(hidden_stem(path) + tail)


def without_nan(value):
    """``value`` (nested dicts, lists and numbers) with every NaN or infinity as
    ``None``: JSON has no NaN, and ``json.dumps`` would write a bare ``NaN`` that
    other readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # NumPy
        return without_nan(value.item())
    return value


def json_text(record) -> str:
    """``record`` as indented JSON (NaN and infinities as ``null``), newline-ended."""
    return json.dumps(without_nan(record), indent=2, allow_nan=False) + "\n"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``, renamed onto ``path`` on success.

    The temporary name keeps the suffix (writers choose formats by it) and starts with a
    dot. On any error it is deleted, so ``path`` either keeps its old content or gets
    the complete new one, never a partial file.
    """
    path = Path(path)
    suffix = split_suffix(path)[1] or path.suffix
    tmp = hidden_sibling(path, f".{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class HeldFolder:
    """A folder's lock held by :func:`hold_folder`; :meth:`release` lets it go and
    removes its file (first, while still held: no one is left holding a removed
    file)."""

    path: Path | None
    handle: object = None

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.handle.close()
        self.handle = None


def hold_folder(
    folder: Path, name: str, *, what: str = "", advice: str = "", wait: bool = False
) -> HeldFolder:
    """Takes the lock file ``name`` in ``folder`` for this process (the operating
    system's ``flock``; with ``wait``, once the process holding it lets it go: Ctrl-C
    and SIGTERM end the wait) and writes the holder's pid, host and start
    in it, so that another run refused while this one lives says who holds it. A
    process that dies, however (SIGKILL, the out-of-memory killer), holds nothing;
    processes on other hosts see it where the shared file system keeps ``flock``
    locks (NFSv4 does). Where there are none (another system, a file system without
    locks, a folder that cannot be written: named when written) nothing is held.

    Raises:
        InputFileError: without ``wait``, another living process holds it (``what``
            is that process, ``advice`` what to do).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return HeldFolder(None)
    import socket
    import time

    path = folder / name
    # the file may be removed by a holder that ends (while several wait, each time)
    for _attempt in range(100 if wait else 3):
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held)
        except OSError:
            return HeldFolder(None)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            handle.close()
            problem = f"another {what} is writing this folder ({other})"
            raise InputFileError(folder, f"{problem}; {advice}") from None
        except OSError:  # a file system without locks
            handle.close()
            return HeldFolder(None)
        except BaseException:  # Ctrl-C or SIGTERM while waiting
            handle.close()
            raise
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except OSError:  # removed meanwhile
            same = False
        if same:
            break
        handle.close()
    else:
        return HeldFolder(None)
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    return HeldFolder(path, handle)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes a text file atomically (see :func:`atomic_output`), UTF-8; file names
    that are not (read into ``text`` with Python's surrogate escapes) keep their
    bytes."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise InputFileError(path, f"cannot write ({exc.strerror or exc})") from None
    return path
