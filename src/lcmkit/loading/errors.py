"""Model-file errors; they live in `lcmkit.io.errors` (the lowest layer) and are re-exported here."""

from lcmkit.io.errors import (  # noqa: F401
    FOREIGN_MESSAGE_CHARS,
    MissingModelFileError,
    ModelFileError,
    describe,
    one_line,
)

__all__ = ["FOREIGN_MESSAGE_CHARS", "MissingModelFileError", "ModelFileError", "describe", "one_line"]
