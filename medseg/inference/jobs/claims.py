"""Claims on cases between processes sharing an output folder, and recovery after a run
that died holding some."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from medseg.inference.jobs.outputs import not_its_output
from medseg.inference.jobs.tables import CaseResult
from medseg.io.files import hidden_sibling

logger = logging.getLogger(__name__)


def _left_to_another_run(path: Path, target: Path, holder: str) -> CaseResult:
    """The result of a scan another living run (``holder``) has in hand: skipped,
    with a warning."""
    note = f"{path}: {IN_HAND_ELSEWHERE} ({holder}); left to it"
    logger.warning("%s", note)
    result = CaseResult(str(path), str(target), "skipped")
    result.warnings.append(note)
    return result


def _found_done(path: Path, target: Path, groups) -> CaseResult:
    """The result of a scan whose label map ``target`` exists: skipped, or failed
    when that label map is another input's."""
    result = CaseResult(str(path), str(target), "skipped")
    problem = not_its_output(target, path, groups)
    if problem:
        result.status, result.error = "failed", problem
    return result


def _in_hand_marker(target: Path) -> Path:
    """The hidden file that says a run has the scan of label map ``target`` in hand
    (reading or segmenting it); a run that dies unannounced (killed for memory, a
    crash in a reader) leaves it."""
    return hidden_sibling(target, ".in-hand")


#: the warning of a scan left to another run that has it in hand
IN_HAND_ELSEWHERE = "in hand by another living run"


def _lock(handle) -> bool | None:
    """Locks an open file for this process (``flock``, without waiting): ``True``;
    ``False`` where another living process holds it; ``None`` where there are no
    locks (another system, a file system without them)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


class _Marks:
    """The in-hand marks of this run (:func:`_in_hand_marker`), each file locked while
    its scan is in hand, so that another run tells a living run's marks (whose scans
    it leaves to it: :func:`_held_elsewhere`) from a dead one's, whatever killed
    it."""

    def __init__(self) -> None:
        self.handles: dict[Path, object] = {}

    def mark(self, target: Path, *, alone: bool) -> bool:
        """Marks ``target``'s scan in hand (``alone``: nothing else in hand);
        ``False`` when another living run has it in hand (it took it since this run
        planned)."""
        marker = _in_hand_marker(target)
        host = socket.gethostname()
        text = json.dumps({"alone": alone, "pid": os.getpid(), "host": host}) + "\n"
        try:
            if target not in self.handles:
                handle = open(marker, "a+", encoding="utf-8")  # noqa: SIM115 (held)
                locked = _lock(handle)
                if not locked:
                    handle.close()
                if locked is False:  # another run took it meanwhile: its mark
                    return False
                self.handles[target] = handle if locked else None
            handle = self.handles[target]
            if handle is None:  # no locks here: a plain mark
                marker.write_text(text, encoding="utf-8")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(text)
                handle.flush()
        except OSError:  # a full disk, say: the scan is still done, unmarked
            logger.debug("cannot mark %s in hand", target, exc_info=True)
        return True

    def unmark(self, target: Path) -> None:
        """Removes this run's mark of ``target`` (while still locked)."""
        if target not in self.handles:
            return
        _in_hand_marker(target).unlink(missing_ok=True)
        handle = self.handles.pop(target)
        if handle is not None:
            handle.close()


def _wait_for_mark(target: Path) -> None:
    """Returns when no living run has ``target``'s scan in hand."""
    try:
        import fcntl

        # for writing: NFS emulates flock with POSIX locks, whose exclusive kind
        # needs it
        handle = open(_in_hand_marker(target), "r+", encoding="utf-8")  # noqa: SIM115
    except (ImportError, OSError):  # no locks, or no mark
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # Ctrl-C and SIGTERM end the wait
        except OSError:
            pass


def _held_elsewhere(target: Path) -> str | None:
    """Who has the scan of ``target`` in hand (``"pid N on HOST"``) when its mark is
    locked by another living run; else ``None`` (no mark, or a dead run's)."""
    try:
        handle = open(  # noqa: SIM115 (for writing, as _wait_for_mark says why)
            _in_hand_marker(target), "r+", encoding="utf-8", errors="replace"
        )
    except OSError:
        return None
    with handle:
        if _lock(handle) is not False:
            return None
        try:
            holder = json.loads(handle.read())
            return f"pid {holder['pid']} on {holder['host']}"
        except (ValueError, KeyError, TypeError):
            return "a run"


def _after_a_dead_run(
    todo: list[tuple[Path, Path]],
) -> tuple[list[tuple[Path, Path]], set[Path], list[tuple[Path, Path]]]:
    """What a run that died unannounced leaves to do, so that one scan that kills
    every run (memory, a reader's crash) costs no other: the scans it had in hand go
    last, each alone (no scan read beside it); one it had in hand alone (so the one
    it died on) is refused by name. Returns ``(todo in order, the suspects' label
    maps, (input, label map) refused)``."""
    fresh, suspects, refused = [], [], []
    for path, target in todo:
        marker = _in_hand_marker(target)
        if not marker.exists():
            fresh.append((path, target))
            continue
        try:
            alone = json.loads(marker.read_text(encoding="utf-8")).get("alone") is True
        except (OSError, ValueError, AttributeError):  # cut short as it was written
            alone = False
        (refused if alone else suspects).append((path, target))
    return fresh + suspects, {target for _, target in suspects}, refused


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that come while inside are delivered at its end (in the main
    thread; elsewhere signals are the main thread's anyway), so that a run stopped
    by one (Ctrl-C, a scheduler's time limit) has recorded every label map it wrote
    and left none half-written."""
    held = []

    def hold(number, frame):
        held.append(number)

    numbers = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(s) is None
        for s in numbers  # a handler set outside Python
    ):
        yield
        return
    earlier = {s: signal.signal(s, hold) for s in numbers}
    try:
        yield
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])
