"""A conversion's per-layer resume state, written on one thread beside the next layer's work.

After each decoder layer ``haq convert`` persists what resuming needs: the calibration activations (75 MB a
SmolLM2 layer at the default 64 x 512 tokens, GBs at Mixtral width), the routing counts, then the progress
file that marks the layer done. Written inline they cost 4-11 s of a 3-minute SmolLM2 conversion; here they
overlap the next layer's work. One write at a time, in order: :meth:`CommitWriter.submit` first waits for the
previous one (whose failure surfaces there), and :meth:`CommitWriter.close` waits for the last, so a failed
write still stops the conversion before the output is finished, and an interrupted one leaves the previous
layer's state (each file atomic, the progress file last).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


class CommitWriter:
    """One background writer thread; the caller hands it snapshots it no longer changes."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="haq-commit")
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args) -> None:
        """Wait for the previous write (raising its error), then start ``write(*args)``."""
        self.wait()
        self._pending = self._pool.submit(write, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, quiet: bool = False) -> None:
        """Wait for the last write and stop the thread; ``quiet``: on a path already failing, its error is not
        raised over the first one."""
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
        finally:
            self._pool.shutdown(wait=True)


def torch_save_atomic(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)
