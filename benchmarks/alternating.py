"""The timing loop the library-vs-library benchmarks share: runs alternate so that machine noise hits both."""

import time
from collections.abc import Callable


def alternating_times(run: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """``{library: [wall seconds per run]}``: ``repeats`` rounds, each running every library once in turn."""
    times = {key: [] for key in run}
    for _ in range(repeats):
        for key, fn in run.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times
