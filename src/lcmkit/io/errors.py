"""The one error type for "this model file is wrong", and the helpers that give every loader the same messages.

`ModelFileError` is a `ValueError` whose message names the file (its absolute path) and what is wrong with it, on one
line, so the CLI can print it as it is and the server can answer it as a 4xx. `.path` holds the file (or folder).
The older, more specific errors (`PipelineFolderError`, `WeightsError`, `SingleFileError`, `ConfigError`,
`ModelNotCachedError`) are subclasses, so code that catches them keeps working.

This module imports nothing from lcmkit (it is in the lowest layer), so every other module can raise it.
"""

from __future__ import annotations

import re
from pathlib import Path

FOREIGN_MESSAGE_CHARS = 300  # how much of another library's error text a wrapped message keeps


def one_line(text: str) -> str:
    """`text` with its line breaks (and the indentation after them) folded into single spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


def describe(error: BaseException, limit: int = FOREIGN_MESSAGE_CHARS) -> str:
    """Another library's exception as one short line, `Type: message`, for wrapping into a ModelFileError."""
    text = one_line(str(error)) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}"


class ModelFileError(ValueError):
    """A model file (or folder) is missing, malformed, or holds something lcmkit cannot load.

    `ModelFileError(problem, path)` reads "<absolute path>: <problem>"; a problem that already names the path is
    not prefixed again. Without a path the message stands alone (`.path` is None) until a loader that knows the
    file adds it with `with_path`.
    """

    path: Path | None = None  # a class default, so subclasses that also derive from OSError have it too

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.problem = one_line(message)
        self.path = Path(path).absolute() if path is not None else None
        super().__init__(self._compose())

    def _compose(self) -> str:
        if self.path is None or str(self.path) in self.problem:
            return self.problem
        return f"{self.path}: {self.problem}"

    def with_path(self, path: str | Path) -> ModelFileError:
        """Name `path` as the wrong file, unless a file is named already; returns self, to re-raise."""
        if self.path is None:
            self.path = Path(path).absolute()
            self.args = (self._compose(),)
        return self

    def __reduce__(self):  # keep `.path` across pickling (worker processes)
        return (type(self), (self.problem, self.path))


class MissingModelFileError(ModelFileError, FileNotFoundError):
    """A file a model needs is not there. Also a `FileNotFoundError`, which these cases raised before."""


__all__ = ["MissingModelFileError", "ModelFileError", "describe", "one_line"]
