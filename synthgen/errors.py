"""User-facing errors: the CLI prints their message (which names the file and line) without a traceback."""

from __future__ import annotations


class SynthgenError(Exception):
    """Base class for every error a user's input or configuration can cause."""


class ConfigError(SynthgenError):
    """A config file is missing, malformed or has an invalid value."""
