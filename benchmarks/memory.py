"""Peak resident memory of this process: the one measure both sides of the memory comparison use."""

from __future__ import annotations

import os
import threading


class PeakRss:
    """Peak resident memory of this process, sampled every 5 ms by a thread (torch allocates outside Python, so
    tracemalloc would not see it). A context manager, or ``start()`` / ``stop()`` around a span."""

    def start(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

