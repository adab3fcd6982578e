"""Where a stage's shards run: the number of local workers, or a Dask scheduler, and the
Dask client for it (``runner.run_shards`` runs the shards)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .settings import SCHEDULER, check_settings, setting

__all__ = ["ClusterConfig", "dask_client"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Where shards run (a pipeline's ``cluster:`` section; each field's help is its
    declaration)."""

    workers: int = setting(
        0,
        help="local worker processes: 0 = one per core, 1 = in one process (no Dask)",
        pipeline="cluster.workers",
        cli=None,
        minimum=0,
        maximum=10_000,
    )
    scheduler: str | None = setting(
        None,
        help="an existing Dask scheduler's address (tcp://host:8786), overriding workers",
        pipeline="cluster.scheduler",
        cli=None,
        pattern=SCHEDULER,
    )
    retries: int = setting(
        2,
        help="how often a shard lost with its worker (or failed) is tried again",
        pipeline="cluster.retries",
        cli=None,
        minimum=0,
        maximum=100,
    )

    def __post_init__(self) -> None:
        check_settings(self)

    def n_workers(self) -> int:
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)

    @property
    def inline(self) -> bool:
        return self.scheduler is None and self.n_workers() == 1


def _open_client(address: str) -> Any:
    """This process's default Dask client when it is connected to ``address``, else None."""
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    if client.status != "running" or client.scheduler is None:
        return None
    return client if client.scheduler.address == address else None


@contextlib.contextmanager
def dask_client(config: ClusterConfig) -> Iterator[Any]:
    """Yield a ``distributed.Client``: to ``config.scheduler`` or to a new LocalCluster.

    A client of this process already connected to ``config.scheduler`` (the one ``run`` holds
    for all its stages) is reused, and left open.
    """
    from distributed import Client, LocalCluster

    if config.scheduler:
        existing = _open_client(config.scheduler)
        if existing is not None:
            log.debug("Dask: reusing the client of %s", config.scheduler)
            yield existing
            return
        client = Client(config.scheduler, timeout="30s")
        log.info("Dask: connected to %s (dashboard %s)", config.scheduler, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=config.n_workers(),
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    log.info(
        "Dask: local cluster of %d workers (dashboard %s)",
        config.n_workers(),
        client.dashboard_link,
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()
