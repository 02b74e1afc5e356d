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
