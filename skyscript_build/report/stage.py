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

import html
import logging
import math
import os
import re
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


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _img(name: str, alt: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'


def _none(what: str) -> str:
    return f'<p class="none">No data yet: {html.escape(what)}</p>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 9px}
td:not(:first-child){text-align:right} th{background:#f3f3f3}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em;margin:.6em 0}
.none{color:#777;font-style:italic} img{max-width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.grid figure{margin:0;border:1px solid #ddd;padding:6px;font-size:.85em}
.toc{margin:1em 0;line-height:1.8} .grid img{width:100%;height:auto;display:block} footer{margin-top:2em;color:#555;font-size:.9em}
"""


def _shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary before ``limit`` characters, with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;") + " …"


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
) -> list[str]:
    chosen = _thumbnails(candidates, dataset, n, problems)
    if not chosen:
        return []
    (out / "samples").mkdir()
    figures = []
    for i, (row, thumb) in enumerate(chosen):
        name = f"samples/{i:03d}.jpg"
        thumb.save(out / name, quality=85)
        multi = row.get("title_multi_objects", "")
        figures.append(
            f"<figure>{_img(name, row['filepath'])}<figcaption><b>{html.escape(row['filepath'])}"
            f'</b><br>{html.escape(row.get("title", ""))}<br><i title="{html.escape(multi)}">'
            f"{html.escape(_shorten(multi, 240))}</i></figcaption></figure>"
        )
    return figures


def _with_contents(body: str) -> str:
    """Give every section heading an anchor and put a list of them after the notes."""
    links = []

    def anchor(m: re.Match[str]) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"<[^>]+>|\(.*?\)", "", m.group(1)).lower())
        slug = slug.strip("-")
        links.append(f'<a href="#{slug}">{m.group(1)}</a>')
        return f'<h2 id="{slug}">{m.group(1)}</h2>'

    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    nav = '<nav class="toc">' + " · ".join(links) + "</nav>"
    first = body.find("<h2 ")
    return body[:first] + nav + "\n" + body[first:] if first >= 0 else body


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


def _write_report(config: ReportConfig, out: Path) -> ReportResult:
    """The report's files, written into the (empty) folder ``out``."""
    problems = Problems()
    snapshot = load_pipeline_snapshot(config.build_dir, problems)
    files = find_dataset_files(config.dataset)
    objects = read_objects(config.build_dir / "objects", problems)
    requests = read_requests(config.build_dir / "requests", problems)
    manifest = read_manifest(config.dataset / "manifest", problems)
    captions = read_captions(files["captions"], problems, keep=4 * config.samples)
    scores = read_scores(files["scores"], problems)
    filtered: dict[str, int] = {}
    for p in files["filtered"]:
        rows = count_rows(p, problems)
        if rows is not None:
            filtered[p.name] = rows

    result = ReportResult(path=out / "index.html")
    counts = result.counts
    if objects is not None:
        counts["objects"] = objects["n"]
    if requests is not None:
        counts["requests"] = requests["n"]
    if manifest is not None:
        for st in ("ok", "skipped", "failed"):
            counts[f"fetched {st}"] = manifest["status"].get(st, 0)
    if captions is not None:
        counts["captions"] = captions["n"]
    for name, rows in filtered.items():
        counts[name] = rows

    backend = (snapshot.get("backend") or {}).get("type")
    synthetic = backend == "emulator" or bool(manifest and manifest["synthetic"])
    pretrained = (snapshot.get("filter") or {}).get("pretrained")
    random_weights = bool(scores and any(_random_weights(p) for p in scores["pretrained"])) or (
        "filter" in snapshot
        and _random_weights(pretrained)
        and (scores is not None or bool(filtered))
    )

    s: list[str] = []  # the page's sections
    name = snapshot.get("name") or config.build_dir.name
    s.append(f"<h1>Build report: {html.escape(str(name))}</h1>")
    s.append(f"<p>Build folder: <code>{html.escape(str(config.build_dir))}</code></p>")
    if synthetic:
        s.append(
            '<p class="note"><b>Synthetic imagery.</b> The images come from the Earth '
            "Engine emulator: a synthetic orthophoto rendered from the OpenStreetMap data "
            "itself, not real aerial or satellite imagery.</p>"
        )
    if random_weights:
        s.append(
            '<p class="note"><b>CLIP ranking is meaningless.</b> The filter used a CLIP '
            "model with random weights (no pretrained checkpoint), so its similarity "
            "scores and the top-k% selections carry no information.</p>"
        )

    notes_end = len(s)
    stage_rows = [
        ("extract: objects", objects["n"] if objects else "not run"),
        ("plan: requests", requests["n"] if requests else "not run"),
    ]
    if manifest is not None:
        stage_rows += [
            (f"fetch: {st}", manifest["status"].get(st, 0)) for st in ("ok", "skipped", "failed")
        ]
        stage_rows.append(("fetch: MB written", round(manifest["bytes"] / 1e6, 2)))
    else:
        stage_rows.append(("fetch", "not run"))
    stage_rows.append(("caption: rows", captions["n"] if captions is not None else "not run"))
    if filtered:
        stage_rows += [(f"filter: {n}", rows) for n, rows in sorted(filtered.items())]
    else:
        stage_rows.append(("filter", "not run"))
    s.append("<h2>Counts per stage</h2>" + _table(stage_rows, ("stage", "count")))

    s.append("<h2>Per image source</h2>")
    if requests is None and manifest is None:
        s.append(_none("no requests or manifest (plan and fetch have not run)"))
    else:
        aliases = sorted(
            set(requests["aliases"] if requests else {})
            | set(manifest["per_alias"] if manifest else {})
        )
        source_rows = []
        for a in aliases:
            per = manifest["per_alias"].get(a, Counter()) if manifest else Counter()
            source_rows.append(
                (
                    a,
                    requests["aliases"].get(a, 0) if requests else 0,
                    per.get("ok", 0),
                    per.get("skipped", 0),
                    per.get("failed", 0),
                )
            )
        s.append(_table(source_rows, ("source", "requests", "ok", "skipped", "failed")))
        if requests:
            result.charts.append(
                _bar_chart(
                    sorted(requests["aliases"].items()),
                    "requests per source",
                    out / "sources.png",
                    horizontal=False,
                )
            )
            s.append(_img("sources.png", "requests per source"))

    s.append(f"<h2>Tag keys (top {config.top_tags})</h2>")
    if objects is None:
        s.append(_none("no objects (extract has not run)"))
    else:
        top = objects["keys"].most_common(config.top_tags)
        kinds = ", ".join(f"{k}: {v:,}" for k, v in sorted(objects["types"].items()))
        s.append(
            f"<p>Objects by OSM type ({html.escape(kinds)}); a tag key counts once per "
            "object that has it.</p>"
        )
        if top:
            result.charts.append(
                _bar_chart(top, "objects per tag key", out / "tag_keys.png", horizontal=True)
            )
            s.append(_img("tag_keys.png", "objects per tag key"))
        s.append(_table(top, ("tag key", "objects")))

    s.append("<h2>Caption lengths</h2>")
    if not captions or not captions["n"]:
        s.append(_none("no caption CSV (caption has not run)"))
    else:
        n = captions["n"]
        lengths = captions["lengths"]
        result.charts.append(
            _histogram(
                sorted(lengths),
                "words per title_multi_objects",
                "words",
                out / "caption_lengths.png",
                bins=range(0, max(lengths) + 2) if max(lengths) < 60 else 50,
                weights=[lengths[k] for k in sorted(lengths)],
            )
        )
        s.append(_img("caption_lengths.png", "caption length histogram"))
        s.append(
            f"<p>{n:,} captions in <code>{html.escape(files['captions'].name)}"
            f"</code>; mean words: title {captions['title_words'] / n:.1f}, "
            f"title_multi_objects {captions['multi_words'] / n:.1f}.</p>"
        )

    s.append("<h2>Map of tiles</h2>")
    if not requests or not requests["lons"]:
        s.append(_none("no tile requests (plan has not run)"))
    else:
        result.charts.append(
            _map_chart(requests, objects["extent"] if objects else None, out / "map.png")
        )
        s.append(_img("map.png", "map of tile centres"))

    s.append("<h2>Sample images</h2>")
    figures = (
        _samples(captions["candidates"], config.dataset, out, config.samples, problems)
        if captions
        else []
    )
    if figures:
        s.append(f'<div class="grid">{"".join(figures)}</div>')
    elif config.samples == 0:
        s.append("<p>None asked for (<code>--samples 0</code>).</p>")
    elif captions and captions["n"]:
        s.append(_none("no sample image could be read (see Problems found)"))
    else:
        s.append(_none("no captioned images (fetch and caption have not run)"))

    s.append("<h2>Failures by reason</h2>")
    if manifest is None:
        s.append(_none("no fetch manifest (fetch has not run)"))
    elif not manifest["reasons"]:
        s.append("<p>No tile was skipped or failed.</p>")
    else:
        reasons = manifest["reasons"].most_common()
        result.charts.append(
            _bar_chart(
                reasons, "tiles not written, by reason", out / "failures.png", horizontal=True
            )
        )
        s.append(_img("failures.png", "failures by reason"))
        s.append(_table(reasons, ("status: reason", "tiles")))

    s.append("<h2>CLIP scores</h2>")
    if not scores or not scores["similarity"]:
        s.append(_none("no scores.parquet (filter has not run)"))
    else:
        sims = scores["similarity"]
        result.charts.append(
            _histogram(sims, "image-caption similarity", "cosine similarity", out / "scores.png")
        )
        s.append(_img("scores.png", "CLIP score distribution"))
        s.append(
            f"<p>Model {html.escape(', '.join(scores['model']))}, pretrained "
            f"{html.escape(', '.join(scores['pretrained']))}; {len(sims):,} scores, "
            f"min {min(sims):.4f}, max {max(sims):.4f}.</p>"
        )

    s.append(
        '<footer>Map data and tags (c) <a href="https://www.openstreetmap.org/copyright">'
        "OpenStreetMap contributors, ODbL</a>. "
        + ("Imagery: synthetic (rendered from OpenStreetMap data). " if synthetic else "")
        + "Made by skyscript-build.</footer>"
    )
    result.skipped = dict(problems.counts)
    if problems:
        s.insert(notes_end, _problems_section(problems))
    body = _with_contents("\n".join(s))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>skyscript-build report: {html.escape(str(name))}</title>"
        f"<style>{_CSS}</style></head><body>\n" + body + "\n</body></html>\n"
    )
    atomic_write_text(result.path, page)
    return result


def _problems_section(problems: Problems) -> str:
    """The files the report skipped: counts by kind, then the first ones by name."""
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(problems.counts.items()))
    listed = _table(problems.files, ("problem", "file", "detail"))
    more = sum(problems.counts.values()) - len(problems.files)
    return (
        f'<h2>Problems found</h2><p class="note">Skipped {html.escape(kinds)}: the counts '
        "on this page leave them out. Rerun the stage that wrote them (fetch checks and "
        "repairs its files) and then the report.</p>"
        + listed
        + (f"<p>... and {more:,} more.</p>" if more > 0 else "")
    )
