"""Earth Engine backend: the real ``earthengine-api`` client, against Google or the emulator.

Per worker process the client is initialised once (``open``): credentials from a
service-account key (``--key-file``, or ``EE_SERVICE_ACCOUNT_KEY`` holding the key's JSON or a
path to it), else Google's default credentials; with ``--ee-url`` and no key, anonymous
credentials (the emulator). A Cloud project is required (``--project``, or the key's own
project). Requests go to the high-volume endpoint unless ``--ee-url`` says otherwise.

For a request, the image used is the first of the source's collection filtered to the tile's
box and year (plus, with a cloud rule, scene cloud cover below the maximum), sorted by scene
cloud cover (cloud-ruled sources) or latest first: the choice is made per tile, whatever block
the tile is later fetched in. ``choose_images`` asks for the id and ``system:time_start`` of
that image for every request of a shard in one ``value:compute`` call. Pixels then come from
``computePixels`` of that image's RGB visualisation (select, per-pixel cloud mask, visualize
min/max/gamma) in a grid on the tile lattice (``PixelGrid``), as NPY: lossless, so a tile cut
from a block has exactly the pixels of its own request, and JPEG encoding happens locally.
That call goes through the ee client's own API resource, built once, with the expression
serialised once per image (see ``_compute_pixels``; ``ee.data.computePixels`` is the
fallback).

The ``ee`` client's own retries are off (``setMaxRetries(0)``); every HTTP request goes through
the run's caps (``limits``) and is retried here by kind: 429, 5xx, timeouts, cut or garbled
bodies with exponential backoff and jitter, honouring Retry-After; a "memory limit"/"too large"
answer splits a tile's grid into 2 x 2 pieces, fetched and stitched (a block of several tiles is
split by fetch instead, along its tiles); an empty year is a ``no-image``
skip (or the next candidate year with ``allow_next_year``). The HTTP transport records each
answer's status per thread, since ``ee`` turns HTTP errors into bare messages. Credentials and
tokens never reach logs, errors or the manifest: errors carry only the status and server text.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import requests
from googleapiclient.errors import HttpError
from requests.adapters import HTTPAdapter

from image_sources import ImageSource

from ...errors import BackendError
from . import BackendConfig
from .base import (
    RETRYABLE_REASONS,
    Backend,
    FetchError,
    ImageChoice,
    PixelGrid,
    TileRequest,
    TileResult,
    call_with_retries,
    ms_to_datetime,
)
from .credentials import KEY_ENV, SCOPES, load_credentials
from .limits import Limits

__all__ = ["EarthEngineBackend", "HIGH_VOLUME_URL"]

log = logging.getLogger(__name__)

HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
TOO_LARGE = ("memory limit", "too large", "request payload size", "total request size")
MAX_SPLIT_DEPTH = 2
_INIT_LOCK = threading.Lock()
_initialised: tuple[Any, ...] | None = None


@dataclass
class _Visual:
    """An image's RGB visualisation as an ee object, and its serialised form once made."""

    expr: Any
    encoded: Any = None


class _Transport:
    """An httplib2-like transport over one pooled ``requests.Session``.

    Records the status and Retry-After of the last answer of each thread, so that an error
    ``ee`` reports as a bare message can be classified by its HTTP status.
    """

    def __init__(self, base_url: str, timeout_s: float, pool: int, limits: Limits) -> None:
        self.timeout_s = timeout_s
        self.limits = limits
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # Read the environment (proxies, CA bundle) once, not on every request as requests
        # does with trust_env (about 1 ms of CPU per request); google-auth does the auth.
        self.session.trust_env = False
        self.session.proxies = requests.utils.get_environ_proxies(base_url)
        self.session.verify = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
        self.last = threading.local()

    def request(
        self,
        uri: str,
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
        redirections: Any = None,
        connection_type: Any = None,
    ) -> tuple[Any, bytes]:
        import httplib2

        self.last.status = None
        self.last.retry_after = None
        try:
            with self.limits.slot():  # the caps hold exactly the HTTP exchange
                response = self.session.request(
                    method, uri, data=body, headers=headers, timeout=self.timeout_s
                )
                content = response.content
        except requests.Timeout as e:
            raise TimeoutError("request timed out") from e
        except requests.RequestException as e:
            raise ConnectionError(type(e).__name__) from e
        self.last.status = response.status_code
        self.last.retry_after = response.headers.get("Retry-After")
        out_headers: dict[str, Any] = dict(response.headers)
        out_headers["status"] = response.status_code
        return httplib2.Response(out_headers), content


def _images_at(source: ImageSource, item: Any) -> Any:
    """The image lookup of one request, as a server-side function of ``[w, s, e, n, year]``:
    the ids and start times of the source's images of that year over that box, best first."""
    import ee

    item = ee.List(item)
    region = ee.Geometry.BBox(item.get(0), item.get(1), item.get(2), item.get(3))
    start = ee.Date.fromYMD(item.get(4), 1, 1)
    coll = (
        ee.ImageCollection(source.collection)
        .filterBounds(region)
        .filterDate(start, start.advance(1, "year"))
    )
    if source.cloud is not None:
        scene = source.cloud.scene_property
        coll = coll.filter(ee.Filter.lt(scene, source.cloud.max_scene_percent))
        coll = coll.sort(scene).limit(1)
    else:
        coll = coll.sort("system:time_start", False).limit(1)
    return ee.List(
        [coll.aggregate_array("system:index"), coll.aggregate_array("system:time_start")]
    )


class EarthEngineBackend(Backend):
    """Tiles from Earth Engine's ``computePixels``."""

    name = "earthengine"
    supports_blocks = True

    def __init__(self, config: BackendConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self._transport: _Transport | None = None
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._visuals: dict[tuple[str, str], _Visual] = {}  # by (alias, image id)
        self._image_api: tuple[Any, str] | None = None

    def _ensure_current(self) -> None:
        """Re-initialise when the process-global ``ee`` client was pointed elsewhere since."""
        if _initialised != self._signature:
            with self._lock:
                if _initialised != self._signature:
                    self.open()

    # -- initialisation ----------------------------------------------------------------------
    def open(self) -> None:
        global _initialised
        import ee

        credentials, key_project = load_credentials(self.config.key_file)
        project = self.config.project or key_project
        if not project:
            raise BackendError(
                "Earth Engine needs a Google Cloud project: pass --project PROJECT "
                "(a project with the Earth Engine API enabled)"
            )
        url = (self.config.ee_url or HIGH_VOLUME_URL).rstrip("/")
        if credentials is None:
            if self.config.ee_url:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            else:
                credentials = self._default_credentials()
        pool = max(10, min(self.config.limits.concurrency, 256))
        self._transport = _Transport(url, self.config.timeout_s, pool, self.limits)
        signature = (url, project, id(self._transport))
        with _INIT_LOCK:
            try:
                ee.Reset()
                ee.Initialize(
                    credentials=credentials,
                    project=project,
                    opt_url=url,
                    http_transport=self._transport,
                )
                ee.data.setMaxRetries(0)
                try:  # the API resource the hot path reuses (see _compute_pixels)
                    self._image_api = (
                        ee.data._get_cloud_projects_raw().image(),
                        ee.data._get_projects_path(),
                    )
                except AttributeError:
                    self._image_api = None
            except ee.EEException as e:
                raise BackendError(
                    f"Earth Engine at {url} refused project {project}: {e}"
                ) from None
            except (TimeoutError, ConnectionError, OSError) as e:
                raise BackendError(
                    f"cannot reach Earth Engine at {url} ({type(e).__name__})"
                ) from None
            _initialised = self._signature = signature
        log.debug("Earth Engine client ready: %s, project %s", url, project)

    @staticmethod
    def _default_credentials() -> Any:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, _ = google.auth.default(scopes=list(SCOPES))
        except DefaultCredentialsError:
            raise BackendError(
                "no Earth Engine credentials: pass --key-file KEY.json, set "
                f"{KEY_ENV}, or run `gcloud auth application-default login`"
            ) from None
        return credentials

    # -- one HTTP call, classified ------------------------------------------------------------
    def _call(self, func: Any, *args: Any) -> Any:
        import ee

        assert self._transport is not None
        try:
            return func(*args)
        except ee.EEException as e:
            raise self._classify(str(e)) from None
        except HttpError as e:
            reason = e._get_reason() if hasattr(e, "_get_reason") else str(e)
            raise self._classify(str(reason)) from None
        except TimeoutError:
            raise FetchError("timeout", retryable=True) from None
        except ConnectionError as e:
            raise FetchError("connection", str(e), retryable=True) from None
        except (ValueError, KeyError, TypeError) as e:  # a garbled JSON answer
            raise FetchError("corrupt", type(e).__name__, retryable=True) from None

    def _classify(self, message: str) -> FetchError:
        assert self._transport is not None
        status = getattr(self._transport.last, "status", None)
        retry_after: float | None = None
        try:
            retry_after = float(getattr(self._transport.last, "retry_after", None) or "")
        except ValueError:
            retry_after = None
        text = message[:300]
        if any(s in message.lower() for s in TOO_LARGE):
            return FetchError("too-large", text, retryable=False)
        if status == 429:
            return FetchError("http-429", text, retryable=True, retry_after=retry_after)
        if status is not None and status >= 500:
            return FetchError(
                "http-5xx", f"{status} {text}", retryable=True, retry_after=retry_after
            )
        if status == 404 or "not found" in message.lower():
            return FetchError("not-found", text)
        if status == 200:
            return FetchError("corrupt", text, retryable=True)
        return FetchError(f"http-{status}" if status else "error", text)

    # -- settings ------------------------------------------------------------------------------
    def check(self, sources: Sequence[ImageSource], samples: Sequence[TileRequest]) -> None:
        """One ``value:compute`` probe: the project and credentials work and every collection
        exists. Refused credentials, an unknown project or collection, or no connection are a
        ``BackendError``; a busy or failing service (429, 5xx) only a warning."""
        import ee

        self._ensure_current()
        url = (self.config.ee_url or HIGH_VOLUME_URL).rstrip("/")
        collections = sorted({s.collection for s in sources})
        probe = ee.List([ee.ImageCollection(c).limit(1).size() for c in collections])
        try:
            call_with_retries(lambda: self._call(ee.data.computeValue, probe), self.config.retry)
        except FetchError as e:
            if e.reason in ("http-429", "http-5xx"):
                log.warning("Earth Engine at %s is busy or failing (%s): going on", url, e.reason)
                return
            if e.reason in ("timeout", "connection"):
                raise BackendError(f"cannot reach Earth Engine at {url} ({e.reason})") from None
            raise BackendError(
                f"Earth Engine at {url} refused the settings check of collection(s) "
                f"{', '.join(collections)}: {e.detail or e.reason}"
            ) from None

    # -- which image ----------------------------------------------------------------------------
    def _years(self, request: TileRequest) -> Sequence[int]:
        return request.years if self.config.allow_next_year else request.years[:1]

    def _lookup(self, pairs: list[tuple[TileRequest, int]]) -> list[tuple[str, int] | None]:
        """The image of each (request, year), in one ``value:compute``: per source, a list of
        ``[w, s, e, n, year]`` mapped server-side through ``_images_at`` (a small expression
        whatever the number of requests: building and serialising one query per request cost
        about 1 ms of CPU per tile)."""
        import ee

        by_source: dict[str, list[int]] = {}
        for k, (request, _) in enumerate(pairs):
            by_source.setdefault(request.alias, []).append(k)
        lists = []
        for alias, ks in by_source.items():
            items = [[*pairs[k][0].box, pairs[k][1]] for k in ks]
            source = self.config.source(alias)
            lists.append(ee.List(items).map(partial(_images_at, source)))
        answer = self._call(ee.data.computeValue, ee.List(lists))
        if not isinstance(answer, list) or [len(a) for a in answer] != [
            len(ks) for ks in by_source.values()
        ]:
            raise FetchError("corrupt", "unexpected image lookup answer", retryable=True)
        out: list[tuple[str, int] | None] = [None] * len(pairs)
        for ks, found in zip(by_source.values(), answer, strict=True):
            for k, (ids, times) in zip(ks, found, strict=True):
                out[k] = (str(ids[0]), int(times[0])) if ids and times else None
        return out

    def _lookup_each(
        self, pairs: list[tuple[TileRequest, int]]
    ) -> list[tuple[tuple[str, int] | None, int] | FetchError]:
        """Every pair's image: in one call, else (that call failed) one call per pair."""
        try:
            found, _ = call_with_retries(lambda: self._lookup(pairs), self.config.retry)
            return [(value, 0) for value in found]  # a shared lookup is charged to no tile
        except FetchError as e:
            if len(pairs) == 1:
                e.attempts = getattr(e, "attempts", 1)  # type: ignore[attr-defined]
                return [e]
            log.warning("image lookup for %d tiles failed (%s); one by one", len(pairs), e.reason)
        out: list[tuple[tuple[str, int] | None, int] | FetchError] = []
        for pair in pairs:
            try:
                one, n = call_with_retries(partial(self._lookup, [pair]), self.config.retry)
                out.append((one[0], n))
            except FetchError as err:
                out.append(err)
        return out

    def choose_images(self, requests: Sequence[TileRequest]) -> list[ImageChoice | TileResult]:
        """Each request's image: its first candidate year with one (only the first year unless
        ``allow_next_year``), looked up for all requests together, one call per year tried."""
        self._ensure_current()
        out: list[ImageChoice | TileResult | None] = [None] * len(requests)
        spent = [0] * len(requests)
        pending = [(i, list(self._years(r))) for i, r in enumerate(requests)]
        while pending:
            for i, years in pending:
                if not years:
                    out[i] = TileResult.skipped("no-image", attempts=max(spent[i], 1))
            asked = [(i, years) for i, years in pending if years]
            answers = self._lookup_each([(requests[i], years[0]) for i, years in asked])
            pending = []
            for (i, years), answer in zip(asked, answers, strict=True):
                if isinstance(answer, FetchError):
                    spent[i] += getattr(answer, "attempts", 1)
                    out[i] = _failure(answer, spent[i])
                    continue
                found, n = answer
                spent[i] += n
                if found is None:
                    pending.append((i, years[1:]))
                    continue
                collection = self.config.source(requests[i].alias).collection
                out[i] = ImageChoice(f"{collection}/{found[0]}", ms_to_datetime(found[1]), years[0])
        return [o for o in out if o is not None]

    # -- pixels ----------------------------------------------------------------------------------
    def _visual_for(self, alias: str, image_id: str) -> _Visual:
        visual = self._visuals.get((alias, image_id))
        if visual is None:  # ee objects are immutable: one per image, shared
            if len(self._visuals) > 4096:
                self._visuals.clear()
            visual = _Visual(self._visual(self.config.source(alias), image_id))
            self._visuals[(alias, image_id)] = visual
        return visual

    def _visual(self, source: ImageSource, image_id: str) -> Any:
        import ee

        image = ee.Image(image_id)
        selected = image.select(list(source.bands))
        cloud = source.cloud
        if cloud is not None and cloud.mask_band and cloud.mask_bits:
            bits = sum(1 << b for b in cloud.mask_bits)
            clear = image.select(cloud.mask_band).bitwiseAnd(bits).eq(0)
            selected = selected.updateMask(clear)
        n = len(source.bands)
        low, high = (float(v) for v in source.stretch)
        gamma = float(source.gamma or 1.0)
        return selected.visualize(min=[low] * n, max=[high] * n, gamma=[gamma] * n)

    def _compute_pixels(self, visual: _Visual, params: dict[str, Any]) -> Any:
        """``image:computePixels`` of ``visual`` through the ee client's own API resource.

        ``ee.data.computePixels`` rebuilds the discovery resource and re-serialises the
        expression on every call (about 3 ms of CPU per tile, half of the client's cost per
        tile in bench/bench_fetch.py's profile); here the resource is built once per process
        and the expression serialised once per image. The same REST call, transport, auth and
        headers; without those client internals (another earthengine-api version) the public
        ``ee.data.computePixels`` is used.
        """
        import ee

        if self._image_api is None:
            return ee.data.computePixels({**params, "expression": visual.expr})
        api, project_path = self._image_api
        if visual.encoded is None:  # serialised once per image (ee objects are immutable)
            visual.encoded = ee.serializer.encode(visual.expr)
        body = {**params, "expression": visual.encoded}
        return api.computePixels(project=project_path, body=body).execute(num_retries=0)

    def _pixels(self, visual: _Visual, grid: PixelGrid) -> np.ndarray:
        a, _, c, _, e, f = grid.transform
        params = {
            "fileFormat": "NPY",
            "grid": {
                "dimensions": {"width": grid.width, "height": grid.height},
                "affineTransform": {
                    "scaleX": a,
                    "shearX": 0.0,
                    "translateX": c,
                    "shearY": 0.0,
                    "scaleY": e,
                    "translateY": f,
                },  # fmt: skip
                "crsCode": grid.crs,
            },
        }
        data = self._call(self._compute_pixels, visual, params)
        if not isinstance(data, bytes | bytearray):
            raise FetchError("corrupt", "computePixels answered no bytes", retryable=True)
        return decode_npy_rgb(bytes(data), grid.height, grid.width)

    def fetch_grid(
        self, request: TileRequest, image: ImageChoice, grid: PixelGrid, split: bool = True
    ) -> tuple[np.ndarray, int]:
        self._ensure_current()
        visual = self._visual_for(request.alias, image.image_id)
        return self._fetch_pixels(visual, grid, split)

    def _fetch_pixels(
        self, visual: _Visual, grid: PixelGrid, split: bool, depth: int = 0
    ) -> tuple[np.ndarray, int]:
        """The grid's RGB pixels and the attempts spent; splits 2 x 2 when too large."""
        try:
            return call_with_retries(lambda: self._pixels(visual, grid), self.config.retry)
        except FetchError as e:
            if (
                not split
                or e.reason != "too-large"
                or depth >= MAX_SPLIT_DEPTH
                or min(grid.width, grid.height) < 2
            ):
                raise
            attempts = getattr(e, "attempts", 1)
        log.debug("a %d x %d grid is too large for one request: 2 x 2", grid.width, grid.height)
        out = np.zeros((grid.height, grid.width, 3), np.uint8)
        for piece in grid.quarters():
            part, n = self._fetch_pixels(visual, piece, split, depth + 1)
            attempts += n
            out[grid.window(piece)] = part
        return out, attempts

    def fetch(self, request: TileRequest) -> TileResult:
        choice = self.choose_images([request])[0]
        if isinstance(choice, TileResult):
            return choice
        try:
            rgb, attempts = self.fetch_grid(request, choice, request.grid)
        except FetchError as e:
            return _failure(e, getattr(e, "attempts", 1))
        return TileResult(
            "ok",
            rgb=rgb,
            image_id=choice.image_id,
            acquisition_time=choice.acquisition_time,
            year=choice.year,
            attempts=attempts,
        )


def _failure(error: FetchError, attempts: int) -> TileResult:
    """A tile's result for a request that failed: retryable later, or a permanent skip."""
    retry_later = error.retryable or error.reason in RETRYABLE_REASONS
    make = TileResult.failed if retry_later else TileResult.skipped
    return make(error.reason, attempts=attempts, detail=error.detail)


def decode_npy_rgb(data: bytes, height: int, width: int) -> np.ndarray:
    """An (h, w, 3) uint8 view of an NPY answer of 3 uint8 bands (a structured array).

    Raises ``FetchError("corrupt")`` (retryable) for anything else: a cut or garbled body.
    """
    from numpy.lib import format as npy

    try:
        stream = io.BytesIO(data)
        version = npy.read_magic(stream)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        offset = stream.tell()
        fields = [dtype.fields[n][0] for n in dtype.names or ()] if dtype.fields else []
        if (
            tuple(shape) != (height, width)
            or fortran
            or len(fields) != 3
            or any(f != np.uint8 for f in fields)
            or dtype.itemsize != 3
        ):
            raise ValueError(f"{shape} of {dtype}")
        rgb = np.frombuffer(data, np.uint8, count=height * width * 3, offset=offset)
    except (ValueError, TypeError, KeyError, EOFError) as e:
        raise FetchError("corrupt", f"not the expected NPY answer ({e})", retryable=True) from None
    return rgb.reshape(height, width, 3)
