"""Concurrency and request-rate caps that hold for the whole run, not per thread.

Earth Engine allows a project 40 concurrent requests and 100 requests/s. The caps work on
two levels:

- Inside a process (any number of threads): a semaphore of ``concurrency`` slots and a token
  bucket refilled at the process's share of ``rate``.
- Across processes (Dask workers, local or remote): a ``distributed.Semaphore`` with
  ``max_leases=concurrency`` and a run-specific name, held for each request, keeps the number
  of requests in flight under the cap cluster-wide. The rate is split statically: each of the
  ``processes`` worker processes gets ``rate / processes`` requests/s. A static split needs no
  round trip per request and can never exceed the cap; its cost is that a worker left without
  work cannot lend its share to the others (shards are many and small, so that is rare).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..._once import once_per_process
from ...errors import ConfigError

__all__ = ["LimitsConfig", "Limits", "TokenBucket", "process_limits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LimitsConfig:
    """Caps for the whole run.

    Attributes:
        concurrency: requests in flight at once, cluster-wide.
        rate: requests per second, cluster-wide.
        processes: worker processes sharing the caps (the rate is split between them).
        cluster_semaphore: name of the ``distributed.Semaphore`` to hold per request when the
            run is on Dask; None in a single process.
    """

    concurrency: int = 40
    rate: float = 100.0
    processes: int = 1
    cluster_semaphore: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not self.rate > 0:
            raise ConfigError(f"--rate must be positive, got {self.rate}")
        if self.processes < 1:
            raise ConfigError(f"processes must be at least 1, got {self.processes}")

    @property
    def process_rate(self) -> float:
        """This process's share of the rate."""
        return self.rate / self.processes


class TokenBucket:
    """A thread-safe rate limiter: ``take()`` blocks until a request may start.

    Each caller reserves the next free start time under a lock (virtual scheduling), then
    sleeps outside it: no thundering herd of threads polling for tokens. Up to ``burst``
    requests may start at once after an idle period.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1.0, min(rate, 10.0)))
        self._interval = 1.0 / self.rate
        self._tat = 0.0  # theoretical arrival time of the next request
        self._lock = threading.Lock()

    def take(self) -> None:
        """Reserve the next start time and sleep until it."""
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat, now)
            self._tat = tat + self._interval
        wait = tat - (self.capacity - 1) * self._interval - now
        if wait > 0:
            time.sleep(wait)


class Limits:
    """The caps as seen from one process; ``with limits.slot():`` around every request."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self._local = threading.BoundedSemaphore(config.concurrency)
        self._bucket = TokenBucket(config.process_rate)
        self._cluster: Any = None
        self._lock = threading.Lock()
        self.in_flight = 0
        self.high_water = 0
        self.requests = 0
        if config.cluster_semaphore:
            self._cluster = _cluster_semaphore(config.cluster_semaphore, config.concurrency)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one concurrency slot (local and cluster-wide) and one rate token."""
        with self._local:
            if self._cluster is not None:
                self._cluster.acquire()
            try:
                self._bucket.take()
                with self._lock:
                    self.in_flight += 1
                    self.requests += 1
                    self.high_water = max(self.high_water, self.in_flight)
                try:
                    yield
                finally:
                    with self._lock:
                        self.in_flight -= 1
            finally:
                if self._cluster is not None:
                    self._cluster.release()


def _cluster_semaphore(name: str, max_leases: int) -> Any:
    """The run's ``distributed.Semaphore`` when this process is a Dask worker, else None."""
    try:
        from distributed import Semaphore, get_worker

        get_worker()
    except (ImportError, ValueError):
        return None
    log.debug("cluster-wide semaphore %s with %d leases", name, max_leases)
    return Semaphore(max_leases=max_leases, name=name)


@once_per_process
def process_limits(config: LimitsConfig) -> Limits:
    """The one ``Limits`` of this process for ``config`` (created on first use)."""
    return Limits(config)
