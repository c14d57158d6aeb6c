"""Import TensorFlow without its native start-up chatter.

TensorFlow 2.21 logs "oneDNN custom operations are on" and "Could not find cuda drivers"
from C++ before absl logging is initialised, ignoring TF_CPP_MIN_LOG_LEVEL. An operator
who mistyped a path should see one line, not that; so the import runs with file
descriptor 2 pointed at /dev/null, and Python-level errors still surface normally.
"""
from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
