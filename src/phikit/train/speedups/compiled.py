"""torch.compile with a way out: a function compiled on first call, run eagerly from then on (with a warning)
if the compiler cannot take it. Why a wrapper: the compiler's errors vary by backend and torch version, and
a training run should lose speed, not stop, when one of its compiled regions fails.

Each `Compiled` is an object of its own run (no registry): whoever needs to know whether compiling took
asks the objects it made (speedups.Speedups.compiled).
"""

from __future__ import annotations

import logging

import torch


class Compiled:
    """torch.compile of `fn`; if the first compile fails (an op torch.compile cannot take), a warning and `fn`
    itself from then on. A layer class's forward is compiled once and shared by every layer of that class."""

    def __init__(self, fn, **options):
        self.plain, self.fn = fn, torch.compile(fn, **options)
        self.failed = None  # None: not called yet; then whether the compile failed

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                out = self.fn(*args, **kwargs)
                self.failed = False
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # the compiler's own errors vary by backend; any of them means: run eagerly
                logging.getLogger("phikit").warning("torch.compile could not take %s (%s: %s); running it eagerly",
                                                    self.plain.__qualname__, type(e).__name__, str(e).splitlines()[0][:200])
                self.failed = True
        return (self.plain if self.failed else self.fn)(*args, **kwargs)
