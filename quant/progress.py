"""Progress of long jobs (quantize, checkpoint loading, dummy writing): a redrawn bar on a terminal, log lines
when stderr is piped (CI, nohup, systemd), so a long run never goes silent.

No dependency. Lives in `quant` (the lowest layer that has long jobs) so the converter, the checkpoint reader and
the CLIs can all use it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

LOG_INTERVAL = 5.0  # seconds between progress lines when the stream is not a terminal


class ProgressBar:
    """Progress on `stream` (default stderr): `desc  42%  1.2/2.9 GB  310 MB/s  ETA 0:05  <extra>`.

    On a terminal the line is redrawn in place at most every `interval` seconds; otherwise a full line is written
    every `log_interval` seconds (first one after `log_interval`), and `close()` writes the final line.
    """

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, interval: float = 0.2,
                 log_interval: float = LOG_INTERVAL, tty: bool | None = None) -> None:
        self.total, self.desc, self.done = max(int(total), 1), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.interval = interval if tty else log_interval
        self.extra = ""
        self.t0 = self._last = time.monotonic()
        self._width = 0

    def update(self, n: int, extra: str | None = None) -> None:
        self.done += n
        if extra is not None:
            self.extra = extra
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The progress text at time `now` (monotonic)."""
        dt = max((time.monotonic() if now is None else now) - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.desc}  {100 * min(self.done / self.total, 1):3.0f}%  {fmt_bytes(self.done)}/"
                f"{fmt_bytes(self.total)}  {fmt_bytes(rate)}/s  ETA {fmt_duration(eta)}  {self.extra}").rstrip()

    def _draw(self, now: float) -> None:
        line = self.line(now)
        if self.tty:
            pad = max(self._width - len(line), 0)
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_duration(s: float) -> str:
    """`m:ss` or `h:mm:ss`; `--:--` when unknown."""
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


__all__ = ["ProgressBar", "fmt_bytes", "fmt_duration", "LOG_INTERVAL"]
