"""Errors a user can act on. The CLI prints them as one line and exits with their code; nothing here imports torch."""

from __future__ import annotations


class ImgrecError(Exception):
    """A problem with the user's data, files or environment: one clear line, exit code 1."""

    exit_code = 1


class UsageError(ImgrecError):
    """A bad command line or option value (unknown data set or model, out-of-range option): exit code 2."""

    exit_code = 2


class Interrupted(ImgrecError):
    """Training stopped by Ctrl-C or SIGTERM after saving its state; the message says how to resume. Exit code 130."""

    exit_code = 130


def printable(text: str) -> str:
    """Text fit for one line of a message or a table row: control characters (a newline or a tab in a file name)
    escaped as Python writes them, everything else (accents included) as it is."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
