"""What ``haq convert`` shows while it runs: tqdm bars on a terminal, plain per-layer lines otherwise, each with an
ETA, since one layer of a large MoE model can take twenty minutes on a few cores.

The ETAs come from measured time only: the layer's from the time per unit so far (``ConvertEvents.unit_done``),
the conversion's from the layers done in this run plus the current layer's fraction.
"""

from __future__ import annotations

import os
import sys
import time


def tqdm_bar(**kw):
    """A tqdm bar on stderr, as wide as the terminal (80 x 24 where the terminal reports no size: tqdm would hide
    the bar)."""
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    fixed = {} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}
    return tqdm(file=sys.stderr, dynamic_ncols=not fixed, **fixed, **kw)


def format_eta(seconds: float | None) -> str:
    """A remaining time as a person reads it: "45 s", "21 min", "2 h 05 min"; "?" while unknown (nothing measured
    yet). Minutes are rounded up, so that "1 min" is never said of 100 s."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = -int(-seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class ConvertProgress:
    """``haq convert``'s progress (an ``offline.convert.ConvertEvents``): when ``enabled``, tqdm bars for the
    calibration set-up, the layers and the units inside the current layer (with the layer's and the conversion's
    ETA); always the per-layer ``[haq] layer i/n: ...`` lines, ending with the conversion's ETA while layers
    remain (printed above the bars). ``clock`` is injectable for tests."""

    UNIT_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, enabled: bool, clock=time.monotonic):
        self.enabled, self.clock = enabled, clock
        self.calib_bar = self.layer_bar = self.unit_bar = None
        self.num_layers = self.todo = self.done_layers = 0  # all layers, those of this run, those finished in it
        self.run_start = self.layer_start = 0.0
        self.fraction = 0.0  # of the current layer's units done

    def _bar(self, **kw):
        return tqdm_bar(**kw)

    def calibration(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.calib_bar is None:
            self.calib_bar = self._bar(total=total, desc="[haq] calibration", unit="step")
        self.calib_bar.update(done - self.calib_bar.n)
        self.calib_bar.set_postfix_str(step)
        if done >= total:
            self.calib_bar.close()

    def layers(self, done: int, total: int) -> None:
        self.num_layers, self.todo, self.run_start = total, total - done, self.clock()
        if self.enabled:
            self.layer_bar = self._bar(total=total, initial=done, desc="[haq] layers", unit="layer")

    def layer_eta(self, done: int, total: int) -> float | None:
        """Seconds left in the current layer: its elapsed time per unit done, times the units left."""
        return (self.clock() - self.layer_start) / done * (total - done) if done else None

    def conversion_eta(self) -> float | None:
        """Seconds left in the conversion: this run's time per layer (finished layers plus the current layer's
        fraction) times the layers left."""
        progress = self.done_layers + self.fraction
        return (self.clock() - self.run_start) / progress * (self.todo - progress) if progress > 0 else None

    def unit_done(self, layer: int, done: int, total: int, what: str) -> None:
        if done == 0:
            self.layer_start, self.fraction = self.clock(), 0.0
        else:
            self.fraction = done / total
        if not self.enabled:
            return
        if done == 0:
            if self.unit_bar is not None:
                self.unit_bar.close()
            self.unit_bar = self._bar(total=total, desc=f"[haq] layer {layer + 1}/{self.num_layers}", unit="unit",
                                      leave=False, bar_format=self.UNIT_FORMAT)
        self.unit_bar.n = done
        self.unit_bar.set_postfix_str(f"ETA layer {format_eta(self.layer_eta(done, total))}, "
                                      f"all {format_eta(self.conversion_eta())}; {what}")

    def layer_done(self, rep, total: int) -> None:
        self.done_layers, self.fraction = self.done_layers + 1, 0.0
        eta = self.conversion_eta() if self.done_layers < self.todo else None
        line = (f"[haq] layer {rep.index + 1}/{total}: {rep.quantized} linears quantized, "
                f"max relative weight error {rep.max_rel_error:.4f}, {rep.seconds:.1f}s"
                + (f"; ETA {format_eta(eta)}" if eta is not None else ""))
        if self.layer_bar is None:
            print(line, file=sys.stderr)
            return
        from tqdm import tqdm

        if self.unit_bar is not None:
            self.unit_bar.close()
            self.unit_bar = None
        tqdm.write(line, file=sys.stderr)
        self.layer_bar.set_postfix_str(f"max rel. error {rep.max_rel_error:.4f}"
                                       + (f", ETA {format_eta(eta)}" if eta is not None else ""), refresh=False)
        self.layer_bar.update(1)

    def close(self) -> None:
        for bar in (self.calib_bar, self.unit_bar, self.layer_bar):
            if bar is not None:
                bar.close()

    def logging(self):
        """Log lines (offline.haq's per-layer timings) printed above the bars, not through them."""
        import contextlib

        if not self.enabled:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()
