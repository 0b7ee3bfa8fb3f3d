"""Ctrl-C, `docker stop` and `kill` end a run where stopping is safe.

Python raises ``KeyboardInterrupt`` between any two bytecodes of the main thread. While
TensorFlow runs, that can be inside TensorFlow's, Keras' or h5py's own Python code,
between two native calls that must go together (a tf.data iterator half made at the start
of an epoch, a weights file half written at its end); unwinding from there can corrupt
the native heap (a training interrupted by SIGINT once died of glibc's
"free(): invalid next size" instead of exiting 130). So while TensorFlow works, inside
:func:`deferred`, a signal is only recorded, and raised as ``KeyboardInterrupt`` at the
next safe point:

- the start of a Keras step, an epoch or a validation step (``callbacks.SafePoints``, a Keras
  callback: about a second away on any dataset);
- :func:`check`, between two of our own steps;
- the end of the ``deferred`` block.

A second signal before that point is raised at once: a user who insists is obeyed.
Outside ``deferred`` (scanning and decoding, where threads may be stuck in a read) a
signal is raised at once, as Python does by default. :func:`install` is called by the
CLI only; in a notebook, Python's own Ctrl-C handling is left as it is.
"""

from __future__ import annotations

import contextlib
import signal

_depth = 0  # how many deferred() blocks are open
_pending: int | None = None  # the signal recorded inside them, not yet raised


def _on_signal(signum, frame):
    global _pending
    if _depth and _pending is None:
        _pending = signum
        return
    _pending = None  # raised now, with this signal's number
    raise KeyboardInterrupt(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM as above (main thread only).

    SIGINT is set too, not left to Python: a process started in the background by a
    non-interactive shell inherits SIGINT as "ignored", and Python then installs no
    KeyboardInterrupt handler of its own.
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def check() -> None:
    """A safe point: raise the signal recorded since the block began, if any."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def deferred(finishing: bool = False):
    """Inside, a signal waits for the next safe point (see the module docstring).

    ``finishing``: the block completes the run's work (its last files), so a signal that
    arrives during it is satisfied by its end and not raised: the process is about to exit.
    """
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if finishing:
        _pending = None
    else:
        check()
