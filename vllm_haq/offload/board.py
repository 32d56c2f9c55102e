"""The offload engine's counters in a small memory-mapped file, read by another process (vLLM's API server).

Why a memory-mapped array of int64 and not the JSON ``stats_file``: the engine serves in vLLM's engine-core
(worker) process and the Prometheus exporter runs in the API-server process, so the counters must cross a
process boundary. The JSON file is rewritten at most every ``stats_interval_s`` (default 30 s: the last
steps before a pause would stay invisible until the next request) and costs a ``json.dump`` and a rename per
write. Stores into a shared mapping cost a few integer writes per MoE layer and step, are visible to a
reader at once (the page cache is shared), and need no lock: every counter only grows, each is one aligned
8-byte store, so a reader sees each counter at a value it really had (two counters may be one step apart
while a step runs). The file is created under a temporary name and renamed into place, so a reader never
sees a header half written.

Layout (native-endian int64): ``MAGIC, VERSION, pid, num_layers``, the totals (:data:`TOTALS`), then per MoE
layer its model layer index and :data:`PER_LAYER` counters.
"""

from __future__ import annotations

import atexit
import os

import numpy as np

MAGIC = 0x48415142  # "HAQB"
VERSION = 1
HEADER = 4
TOTALS = ("steps", "hits", "misses", "fetches", "prefetches", "prefetch_hits", "cpu_experts", "cpu_expert_tokens",
          "bytes_h2d", "recovered_faults")
PER_LAYER = ("hits", "misses", "fetches", "cpu_expert_tokens")
_ROW = 1 + len(PER_LAYER)


class CounterBoard:
    """Writer side: the engine's counters mirrored into ``path`` (created here, removed by :meth:`close`)."""

    def __init__(self, path: str, layer_indexes: list[int]):
        self.path = path
        size = HEADER + len(TOTALS) + _ROW * len(layer_indexes)
        tmp = f"{path}.tmp{os.getpid()}"
        self._arr = np.memmap(tmp, dtype=np.int64, mode="w+", shape=(size,))
        self._arr[:HEADER] = (MAGIC, VERSION, os.getpid(), len(layer_indexes))
        rows = self._rows()
        rows[:, 0] = layer_indexes
        self._arr.flush()
        os.replace(tmp, path)  # the mapping stays on the renamed file
        atexit.register(remove_board, path)  # vLLM stops its engine core without closing the offload engine


    def _rows(self) -> np.ndarray:
        return self._arr[HEADER + len(TOTALS):].reshape(-1, _ROW)

    def publish(self, counters, pos: int, per_layer: tuple[int, int, int, int], totals: bool = True) -> None:
        """Add one step of layer ``pos``; with ``totals``, also copy the totals of ``counters`` (an
        ``OffloadCounters``). The engine copies them once per model step (at its last MoE layer): each element
        store into the mapping costs ~0.3 µs from Python, and the decode step has about 100 µs per layer."""
        t = self._arr
        row = HEADER + len(TOTALS) + _ROW * pos + 1
        for i, v in enumerate(per_layer):
            t[row + i] += v
        if totals:
            for i, name in enumerate(TOTALS):
                t[HEADER + i] = getattr(counters, name)

    def close(self) -> None:
        """Remove the file: its reader (the API server) treats a missing file as "no offloading here"."""
        arr, self._arr = self._arr, None
        del arr
        remove_board(self.path)


def remove_board(path: str) -> None:
    """Remove a board file if it is still there (the writer and the reader both clean up at exit)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_board(path: str) -> dict | None:
    """Reader side: ``{"pid", "totals": {name: int}, "layers": {layer_index: {name: int}}}`` of the board at
    ``path``, or None when there is none (yet) or it is not a board of this version."""
    try:
        arr = np.fromfile(path, dtype=np.int64)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if arr.size < HEADER + len(TOTALS) or arr[0] != MAGIC or arr[1] != VERSION:
        return None
    n = int(arr[3])
    if arr.size != HEADER + len(TOTALS) + _ROW * n:
        return None
    totals = {name: int(arr[HEADER + i]) for i, name in enumerate(TOTALS)}
    rows = arr[HEADER + len(TOTALS):].reshape(n, _ROW)
    layers = {int(r[0]): {name: int(r[1 + i]) for i, name in enumerate(PER_LAYER)} for r in rows}
    return {"pid": int(arr[2]), "totals": totals, "layers": layers}
