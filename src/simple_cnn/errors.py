"""The project's exceptions, which ``cli`` turns into one line on stderr and an exit code,
and :func:`printable`, which keeps any name in such a line (or a table row) on one line."""

import os

# Characters that would break a one-line message, a tab-separated row or a terminal:
# control characters (newline, tab, escape sequences) and bidirectional overrides.
_UNSAFE = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA0))}
_UNSAFE |= {ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}
_UNSAFE |= {i: f"\\u{i:04x}" for i in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def printable(name: str) -> str:
    """A file or class name (or a message) safe to print on one line: bytes that are not
    UTF-8 as ``\\xNN``, control characters escaped (``\\n``, ``\\x1b``), so it can neither
    break a line nor drive the terminal."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").translate(_UNSAFE)


class SimpleCNNError(Exception):
    """A problem the user can fix; the message says what and how. Exit code 1."""

    exit_code = 1


class UsageError(SimpleCNNError):
    """A bad flag or flag value. Exit code 2, like argparse's own usage errors."""

    exit_code = 2


class DataError(SimpleCNNError):
    """A dataset, image or model file that cannot be used as given."""
