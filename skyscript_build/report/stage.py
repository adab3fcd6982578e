"""The build report: one static HTML page (plus PNG charts) describing a build folder.

``run_report(ReportConfig(build_dir))`` reads only the stages' files (docs/architecture.md):
``objects/``, ``requests/``, the dataset's ``manifest/``, caption CSV, filtered CSVs and
``scores.parquet``, and the ``pipeline.json`` that ``run`` writes. It writes
``report/index.html`` with counts per stage, per image source and per tag key, the caption
length histogram, a map of the tiles, sample images with their captions, failures by reason
and the CLIP score distribution. A section whose stage has not run yet says so.

A file it cannot read (a truncated parquet part, a sample image that is missing or does not
decode) is skipped and counted: the page lists it under "Problems found" and the summary line
counts it. The report is made in a temporary folder beside ``out`` and moved in place when
complete, so a failed run leaves the previous report as it was, and a refused one creates
nothing.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import atomic_write_text, check_out_dir, leave_no_empty_folders
from ..settings import check_settings, setting
from ._data import (
    Problems,
    count_rows,
    find_dataset_files,
    load_pipeline_snapshot,
    read_captions,
    read_manifest,
    read_objects,
    read_requests,
    read_scores,
)

__all__ = ["ReportConfig", "ReportResult", "run_report", "find_dataset_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """What to report on, checked on creation (each field's help is its declaration)."""

    build_dir: Path = setting(
        help="the build folder (objects/, requests/, dataset/)", cli="BUILD_DIR"
    )
    out: Path | None = setting(None, help="report folder (default: BUILD_DIR/report)")
    dataset_dir: Path | None = setting(
        None, help="dataset folder (default: BUILD_DIR/dataset)", cli="--dataset"
    )
    samples: int = setting(12, help="sample images shown", minimum=0)
    top_tags: int = setting(50, help="tag keys the per-key table lists", minimum=1)

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.build_dir.is_dir():
            raise InputError(self.build_dir, "build folder not found")
        if self.dataset_dir is not None and not self.dataset_dir.is_dir():
            raise InputError(self.dataset_dir, "dataset folder not found")
        check_out_dir(self.out_dir, "--out")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else self.build_dir / "report"

    @property
    def dataset(self) -> Path:
        return Path(self.dataset_dir) if self.dataset_dir else self.build_dir / "dataset"


@dataclass
class ReportResult:
    """Where the report is and what it found."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    charts: list[str] = field(default_factory=list)
    #: files skipped, by kind (``unreadable parquet file``, ``missing image``, ...)
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        shown = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        line = f"report: {self.path} ({shown or 'no stage outputs yet'})"
        if self.skipped:
            kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
            line += f"; skipped {sum(self.skipped.values())} files ({kinds}): see the page"
        return line


# --- charts -------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return fig, ax


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path.name


def _random_weights(pretrained: Any) -> bool:
    """True for the filter's "no checkpoint" (``none``, stored as ``none:seed<N>``)."""
    text = str(pretrained or "").lower()
    return text in ("", "none") or text.startswith("none:")


def _bar_chart(counts: list[tuple[str, int]], title: str, path: Path, *, horizontal: bool) -> str:
    fig, ax = _figure(7.0, max(2.4, 0.22 * len(counts) + 1.0) if horizontal else 3.6)
    labels = [c[0] for c in counts]
    values = [c[1] for c in counts]
    if horizontal:
        ax.barh(range(len(values)), values, color="#3b6ea8")
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("count")
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_xscale("log")
            ax.set_xlabel("count (log scale)")
    else:
        ax.bar(range(len(values)), values, color="#3b6ea8")
        ax.set_xticks(range(len(values)), labels)
        ax.set_ylabel("count")
    ax.set_title(title)
    return _save(fig, path)


def _histogram(
    values: Sequence[float],
    title: str,
    xlabel: str,
    path: Path,
    bins: Any = 30,
    weights: Sequence[float] | None = None,
) -> str:
    fig, ax = _figure()
    ax.hist(values, bins=bins, weights=weights, color="#3b6ea8", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _save(fig, path)


def _map_chart(requests: dict[str, Any], extent: tuple[float, ...] | None, path: Path) -> str:
    fig, ax = _figure(6.5, 5.5)
    labels = requests["labels"]
    for alias in sorted(set(labels)):
        xs = [x for x, a in zip(requests["lons"], labels, strict=True) if a == alias]
        ys = [y for y, a in zip(requests["lats"], labels, strict=True) if a == alias]
        ax.scatter(xs, ys, s=6, alpha=0.7, label=f"{alias} ({len(xs)})")
    if extent is not None:
        import matplotlib.patches as patches

        w, s, e, n = extent
        ax.add_patch(
            patches.Rectangle(
                (w, s), e - w, n - s, fill=False, ls="--", ec="grey", label="objects' extent"
            )
        )
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("tile centres")
    ax.legend(fontsize=8, loc="best")
    lats = requests["lats"]
    mid = math.radians((min(lats) + max(lats)) / 2)
    ax.set_aspect(1 / max(0.05, math.cos(mid)), adjustable="datalim")
    return _save(fig, path)


# --- the page ----------------------------------------------------------------------------


def _number(value: Any) -> str:
    """A table cell: whole numbers with thousands separators, floats to 4 digits."""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary before ``limit`` characters, with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;") + " …"


@functools.cache
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("skyscript_build.report", "."),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["number"] = _number
    env.filters["shorten"] = _shorten
    return env.get_template("report.html")


def _thumbnails(
    candidates: list[dict[str, str]], dataset: Path, n: int, problems: Problems
) -> list[tuple[dict[str, str], Any]]:
    """Up to ``n`` (row, thumbnail) of the candidates whose image is there and decodes, by
    file path; the others are skipped and noted in ``problems``."""
    from PIL import Image

    chosen: list[tuple[dict[str, str], Any]] = []
    for row in candidates:
        if len(chosen) == n:
            break
        path = dataset / row.get("filepath", "")
        if not path.is_file():
            problems.add("missing image", path, "listed in the caption CSV, not on disk")
            continue
        try:
            with Image.open(path) as source:
                thumb = source.convert("RGB")  # decodes the whole image
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            problems.add("corrupt image", path, f"does not decode ({e})")
            continue
        thumb.thumbnail((256, 256))
        chosen.append((row, thumb))
    return sorted(chosen, key=lambda item: item[0]["filepath"])


def _samples(
    candidates: list[dict[str, str]], dataset: Path, out: Path, n: int, problems: Problems
) -> list[dict[str, str]]:
    """Thumbnails of up to ``n`` captioned images in ``out/samples/``, with their captions."""
    chosen = _thumbnails(candidates, dataset, n, problems)
    if not chosen:
        return []
    (out / "samples").mkdir()
    samples = []
    for i, (row, thumb) in enumerate(chosen):
        name = f"samples/{i:03d}.jpg"
        thumb.save(out / name, quality=85)
        samples.append(
            {
                "image": name,
                "filepath": row["filepath"],
                "title": row.get("title", ""),
                "multi": row.get("title_multi_objects", ""),
            }
        )
    return samples


def run_report(config: ReportConfig) -> ReportResult:
    """Write ``index.html`` and its charts for ``config.build_dir``; return where and counts."""
    out = config.out_dir
    with leave_no_empty_folders(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            result = _write_report(config, work)
            _publish(work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result.path = out / "index.html"
    log.info("report written to %s", result.path)
    return result


def _publish(work: Path, out: Path) -> None:
    """Move the finished report from ``work`` into ``out``: the whole folder when ``out`` is
    new; else its charts and samples in place of the old ones, ``index.html`` last."""
    if not out.exists():
        os.rename(work, out)
        return
    for old in [*out.glob("*.png"), out / "samples"]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    for new in sorted(work.iterdir()):
        if new.name != "index.html":
            os.replace(new, out / new.name)
    os.replace(work / "index.html", out / "index.html")


@dataclass
class _Build:
    """What the report read from a build folder; a stage's entry is None until it has run."""

    name: str
    snapshot: dict[str, Any]
    captions_csv: Path | None
    objects: dict[str, Any] | None
    requests: dict[str, Any] | None
    manifest: dict[str, Any] | None
    captions: dict[str, Any] | None
    scores: dict[str, Any] | None
    filtered: dict[str, int]  # rows per filtered CSV

    @property
    def synthetic(self) -> bool:
        """The imagery came from the emulator (the backend, or the images' ids say so)."""
        backend = (self.snapshot.get("backend") or {}).get("type")
        return backend == "emulator" or bool(self.manifest and self.manifest["synthetic"])

    @property
    def random_weights(self) -> bool:
        """The scores (or the filtered CSVs) came from a CLIP model with random weights."""
        if self.scores and any(_random_weights(p) for p in self.scores["pretrained"]):
            return True
        pretrained = (self.snapshot.get("filter") or {}).get("pretrained")
        return (
            "filter" in self.snapshot
            and _random_weights(pretrained)
            and (self.scores is not None or bool(self.filtered))
        )


def _read_build(config: ReportConfig, problems: Problems) -> _Build:
    snapshot = load_pipeline_snapshot(config.build_dir, problems)
    files = find_dataset_files(config.dataset)
    filtered: dict[str, int] = {}
    for p in files["filtered"]:
        rows = count_rows(p, problems)
        if rows is not None:
            filtered[p.name] = rows
    return _Build(
        name=str(snapshot.get("name") or config.build_dir.name),
        snapshot=snapshot,
        captions_csv=files["captions"],
        objects=read_objects(config.build_dir / "objects", problems),
        requests=read_requests(config.build_dir / "requests", problems),
        manifest=read_manifest(config.dataset / "manifest", problems),
        captions=read_captions(files["captions"], problems, keep=4 * config.samples),
        scores=read_scores(files["scores"], problems),
        filtered=filtered,
    )


def _counts(build: _Build) -> dict[str, int]:
    """The counts of the summary line (and of ``ReportResult.counts``)."""
    counts: dict[str, int] = {}
    if build.objects is not None:
        counts["objects"] = build.objects["n"]
    if build.requests is not None:
        counts["requests"] = build.requests["n"]
    if build.manifest is not None:
        for st in ("ok", "skipped", "failed"):
            counts[f"fetched {st}"] = build.manifest["status"].get(st, 0)
    if build.captions is not None:
        counts["captions"] = build.captions["n"]
    return {**counts, **build.filtered}


def _draw_charts(build: _Build, top_tags: int, out: Path) -> list[str]:
    """The PNG charts of the data the build has, drawn into ``out``; their file names."""
    charts = []
    objects, requests, captions, scores = (
        build.objects,
        build.requests,
        build.captions,
        build.scores,
    )
    if requests:
        counts = sorted(requests["aliases"].items())
        charts.append(
            _bar_chart(counts, "requests per source", out / "sources.png", horizontal=False)
        )
    top = objects["keys"].most_common(top_tags) if objects else []
    if top:
        charts.append(_bar_chart(top, "objects per tag key", out / "tag_keys.png", horizontal=True))
    if captions and captions["n"]:
        lengths = captions["lengths"]
        bins = range(0, max(lengths) + 2) if max(lengths) < 60 else 50
        weights = [lengths[k] for k in sorted(lengths)]
        path = out / "caption_lengths.png"
        title = "words per title_multi_objects"
        charts.append(_histogram(sorted(lengths), title, "words", path, bins=bins, weights=weights))
    if requests and requests["lons"]:
        charts.append(_map_chart(requests, objects["extent"] if objects else None, out / "map.png"))
    if build.manifest and build.manifest["reasons"]:
        reasons = build.manifest["reasons"].most_common()
        title = "tiles not written, by reason"
        charts.append(_bar_chart(reasons, title, out / "failures.png", horizontal=True))
    if scores and scores["similarity"]:
        path = out / "scores.png"
        title = "image-caption similarity"
        charts.append(_histogram(scores["similarity"], title, "cosine similarity", path))
    return charts


def _stage_rows(build: _Build) -> list[tuple[str, Any]]:
    """The "Counts per stage" table."""
    rows: list[tuple[str, Any]] = [
        ("extract: objects", build.objects["n"] if build.objects else "not run"),
        ("plan: requests", build.requests["n"] if build.requests else "not run"),
    ]
    if build.manifest is not None:
        status = build.manifest["status"]
        rows += [(f"fetch: {st}", status.get(st, 0)) for st in ("ok", "skipped", "failed")]
        rows.append(("fetch: MB written", round(build.manifest["bytes"] / 1e6, 2)))
    else:
        rows.append(("fetch", "not run"))
    rows.append(("caption: rows", build.captions["n"] if build.captions is not None else "not run"))
    if build.filtered:
        rows += [(f"filter: {n}", rows) for n, rows in sorted(build.filtered.items())]
    else:
        rows.append(("filter", "not run"))
    return rows


def _source_rows(build: _Build) -> list[tuple[str, int, int, int, int]] | None:
    """The "Per image source" table: requests, and fetched tiles by status, per alias."""
    requests, manifest = build.requests, build.manifest
    if requests is None and manifest is None:
        return None
    planned = requests["aliases"] if requests else {}
    fetched = manifest["per_alias"] if manifest else {}
    rows = []
    for alias in sorted(set(planned) | set(fetched)):
        per = fetched.get(alias, Counter())
        rows.append((alias, planned.get(alias, 0), per["ok"], per["skipped"], per["failed"]))
    return rows


def _page(
    build: _Build,
    config: ReportConfig,
    charts: list[str],
    samples: list[dict[str, str]],
    problems: Problems,
) -> str:
    """The page (``report.html``) for what the build has."""
    objects, captions, scores = build.objects, build.captions, build.scores
    more = sum(problems.counts.values()) - len(problems.files)
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(problems.counts.items()))
    return str(
        _template().render(
            name=build.name,
            build_dir=str(config.build_dir),
            synthetic=build.synthetic,
            random_weights=build.random_weights,
            charts=set(charts),
            problems={"kinds": kinds, "files": problems.files, "more": more} if problems else None,
            stage_rows=_stage_rows(build),
            source_rows=_source_rows(build),
            top_tags=config.top_tags,
            objects=objects and {
                "types": ", ".join(f"{k}: {v:,}" for k, v in sorted(objects["types"].items())),
                "top": objects["keys"].most_common(config.top_tags),
            },
            captions=captions and captions["n"] and {
                "n": captions["n"],
                "file": build.captions_csv.name if build.captions_csv else "",
                "mean_title_words": captions["title_words"] / captions["n"],
                "mean_multi_words": captions["multi_words"] / captions["n"],
            },
            samples=samples,
            samples_asked=config.samples,
            reasons=None if build.manifest is None else build.manifest["reasons"].most_common(),
            scores=scores and scores["similarity"] and {
                "model": ", ".join(scores["model"]),
                "pretrained": ", ".join(scores["pretrained"]),
                "n": len(scores["similarity"]),
                "min": min(scores["similarity"]),
                "max": max(scores["similarity"]),
            },
        )
    )  # fmt: skip


def _write_report(config: ReportConfig, out: Path) -> ReportResult:
    """The report's files, written into the (empty) folder ``out``."""
    problems = Problems()
    build = _read_build(config, problems)
    result = ReportResult(path=out / "index.html", counts=_counts(build))
    result.charts = _draw_charts(build, config.top_tags, out)
    candidates = build.captions["candidates"] if build.captions else []
    samples = _samples(candidates, config.dataset, out, config.samples, problems)
    result.skipped = dict(problems.counts)
    atomic_write_text(result.path, _page(build, config, result.charts, samples, problems))
    return result
