"""Errors a user can cause by handing medseg a bad file or folder."""

from __future__ import annotations

from pathlib import Path


class InputFileError(ValueError):
    """A file or folder that cannot be used, with the path and the problem in one line.

    The command line prints ``str(error)`` as the single error line and exits with 2.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, in a few words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep picklable across worker processes
        return (type(self), (self.path, self.problem))


def some_of(names, most: int = 5) -> str:
    """``a, b, c`` of a list in a message, the first ``most`` and how many more."""
    names = [str(n) for n in names]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


class ConfigError(ValueError):
    """A setting that cannot work with this data or model (the command line names the
    config file with it)."""
