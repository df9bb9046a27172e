"""Dataset errors: each names the file and, where there is one, the line, so a user can fix it."""

from __future__ import annotations

from pathlib import Path

from synthgen.errors import SynthgenError


class DataError(SynthgenError):
    """An annotation, image or raster a user gave is unreadable or inconsistent.

    `file`, `line` and `reason` are kept apart so `on_error="skip"` can list them in a report."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.file = str(file) if file is not None else None
        self.line = line
        self.reason = reason or message
