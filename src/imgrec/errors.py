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


# What an OSError's errno means for the user, in the words of the one line they read.
_CAUSES = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded", "EACCES": "permission denied",
           "EPERM": "permission denied", "EROFS": "read-only file system", "ENAMETOOLONG": "file name too long",
           "EFBIG": "file too large", "ENOTDIR": "a part of the path is not a folder",
           "EISDIR": "it is a folder", "ENOENT": "no such file or folder"}


def os_error_cause(exc: OSError) -> str:
    """An OSError's cause in plain words ("no space left on device"), without errno numbers or paths."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    return _CAUSES.get(name) or (exc.strerror or str(exc) or type(exc).__name__).lower()


def write_error(path: object, exc: OSError, needed: int | None = None) -> ImgrecError:
    """The one-line error for a write that failed: the path and the cause (with the bytes it needed, when known)."""
    cause = os_error_cause(exc)
    if needed and cause in ("no space left on device", "disk quota exceeded"):
        cause += f" (it needs about {_size(needed)})"
    return ImgrecError(f"cannot write {path}: {cause}")


def _size(count: float) -> str:
    if count < 1000:
        return f"{count:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if count < 1000 or unit == "GB":
            break
    return f"{count:.1f} {unit}"
