"""Point the real ``ee`` client at an emulator (or any Earth Engine REST URL)."""

from __future__ import annotations

import threading

__all__ = ["init_ee_client"]

_lock = threading.Lock()


def init_ee_client(
    url: str, project: str = "demo", max_retries: int | None = None, deadline_ms: int | None = None
) -> None:
    """Initialise the process-global ``ee`` client against ``url`` with anonymous credentials.

    The ``ee`` client keeps global state: calling this again re-initialises it, e.g. against
    another emulator. ``max_retries`` sets the client's own retries of 429/5xx answers (``ee``'s
    default is 5); ``deadline_ms`` its per-request timeout.
    """
    import ee
    from google.auth.credentials import AnonymousCredentials

    with _lock:
        ee.Reset()
        ee.Initialize(credentials=AnonymousCredentials(), project=project, opt_url=url)
        if max_retries is not None:
            ee.data.setMaxRetries(max_retries)
        if deadline_ms is not None:
            ee.data.setDeadline(deadline_ms)
