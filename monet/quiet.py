"""Keeping what native libraries print on the process's own file descriptors off the user's."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_fd(fd: int):
    """Send what is written to file descriptor ``fd`` (1: standard output, 2: standard
    error) to the null device while the block runs; where ``fd`` cannot be duplicated,
    leave it as it is."""
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
