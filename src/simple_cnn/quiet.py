"""Importing TensorFlow (and starting LiteRT) without their C++ start-up noise.

TensorFlow's C++ core prints lines such as "oneDNN custom operations are on" straight
to file descriptor 2 before its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` alone
does not hide them; LiteRT prints "Created TensorFlow Lite XNNPACK delegate" the same
way. When that variable is "3" (the CLI sets it unless ``--verbose``), these steps run
with fd 2 pointed at /dev/null. Every TensorFlow or Keras import in simple_cnn goes
through :func:`import_keras` or :func:`import_tensorflow`.

Importing TensorFlow this way also keeps it lean: scikit-learn and matplotlib stay out of
Keras' import (:func:`keras_extras_deferred`), and glibc's malloc keeps at most :data:`MALLOC_ARENAS` arenas
for TensorFlow's threads (:func:`limit_malloc_arenas`); in a CLI process, the garbage collector
leaves TensorFlow's objects alone once they are imported (:func:`freeze_collector_after_import`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys

# glibc's malloc gives each thread that contends for memory an arena of its own, up to eight
# per core, and each keeps freed memory for reuse; TensorFlow's thread pools fill several.
# Two arenas lower the training peak at no measured cost in speed (bench/README.md,
# "Memory: malloc arenas"). MALLOC_ARENA_MAX in the environment, read by glibc at start-up,
# takes precedence.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h

# Whether to freeze the garbage collector once TensorFlow is imported (freeze_collector_after_import).
_freeze_after_import = False


@contextlib.contextmanager
def native_stderr_hidden():
    """Point fd 2 at /dev/null for the duration, if TF_CPP_MIN_LOG_LEVEL is 3."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the threads this process starts from now on; whether it did.

    Not on a C library without glibc's ``mallopt`` (musl's ignores it), nor when the
    environment sets ``MALLOC_ARENA_MAX`` itself.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1


def import_tensorflow():
    if "tensorflow" not in sys.modules:
        limit_malloc_arenas()  # before TensorFlow starts its thread pools
        with native_stderr_hidden(), keras_extras_deferred():  # importing TensorFlow imports Keras
            import tensorflow
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3":
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)  # e.g. the ".h5 is legacy" warning
            tensorflow.get_logger().setLevel("ERROR")
        if _freeze_after_import:
            gc.freeze()
    import tensorflow

    return tensorflow


def freeze_collector_after_import() -> None:
    """Freeze the garbage collector once TensorFlow is imported: for a process that runs one command.

    Every full collection walks all of TensorFlow's and Keras' objects, which live until the
    process ends; frozen, they are left out (bench/README.md, "The test suite"). The CLI asks
    for this; a notebook, whose own objects would be frozen with them and never collected if
    they became cyclic garbage, keeps Python's default.
    """
    global _freeze_after_import
    _freeze_after_import = True
    if "tensorflow" in sys.modules:
        gc.freeze()


def import_keras():
    import_tensorflow()
    import keras

    return keras


# Packages Keras imports, when installed, for parts of Keras simple_cnn does not use: the
# scikit-learn estimators of keras.wrappers and the matplotlib plots of keras.visualization.
KERAS_EXTRAS = ("sklearn", "matplotlib")


@contextlib.contextmanager
def keras_extras_deferred(names: tuple[str, ...] = KERAS_EXTRAS):
    """Keep Keras' import from loading scikit-learn and matplotlib, which simple_cnn imports only where it uses them.

    Memory held for the whole of a run, whose peak is a goal, and import time in every
    command that never plots (measured: bench/README.md, "Memory" and "The test suite").
    Marking a module absent makes Keras take its own "not installed" path; afterwards it
    imports as usual. One that is already loaded is left alone, so a notebook that wants
    ``keras.wrappers`` or ``keras.visualization`` imports scikit-learn or matplotlib before
    simple_cnn first imports TensorFlow.
    """
    absent = [name for name in names if name not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # the import system's "not importable" marker
    try:
        yield
    finally:
        for name in absent:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
