"""From a validated pipeline to each stage's own frozen config (used by ``pipeline.run_pipeline``).

A stage's config is built just before the stage runs (some configs check that the previous
stage's files exist). Settings the pipeline file leaves out take the stage's own defaults:
only the keys given are passed. A stage config's own ``ConfigError`` is re-raised naming the
pipeline file. Before any stage runs, each chosen stage's ``check`` validates the settings that
need no earlier stage's files (a stage config that reads none is simply built), so a bad
setting of the last stage stops the run before the first one starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cluster import ClusterConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from ._config import PipelineConfig

__all__ = [
    "RunContext",
    "StageSpec",
    "STAGE_SPECS",
    "stage_module",
    "EMULATOR_PROJECT",
]

#: The Cloud project name the emulator is initialised with (any name works there).
EMULATOR_PROJECT = "skyscript-emulator"


@dataclass(frozen=True)
class RunContext:
    """What a run adds to the pipeline: the scheduler address and the emulator's URL."""

    scheduler: str | None = None
    emulator_url: str | None = None


@dataclass(frozen=True)
class StageSpec:
    """How to run one stage: its module, its entry function and its config builder.

    ``dask``: when the stage runs its shards on the run's Dask client (the scheduler address
    in ``RunContext``): ``always`` when the run uses Dask at all (a LocalCluster too),
    ``scheduler`` only on an existing cluster (``--scheduler``; locally its own pool is
    faster), ``never``: in this process (or a local pool of its own).

    ``check(pipeline, module)``: raises on a bad setting, reading no earlier stage's files;
    run before any stage starts (None: nothing to check early).
    """

    module: str
    entry: str
    build: Callable[[PipelineConfig, RunContext, Any], Any]
    dask: str = "never"
    check: Callable[[PipelineConfig, Any], Any] | None = None

    def on_dask(self, cluster: ClusterConfig) -> bool:
        """Whether the stage runs on the run's Dask client, given where the run's shards go."""
        if cluster.inline:
            return False
        return self.dask == "always" or (self.dask == "scheduler" and bool(cluster.scheduler))


def stage_module(stage: str, module: str) -> Any:
    """Import a stage's module; a missing one is a clear ConfigError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise ConfigError(f"stage {stage} is not available in this version") from None
        raise


def _workers(p: PipelineConfig) -> int:
    return p.cluster.workers


def _extract(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    return mod.ExtractConfig(
        out=p.objects_dir,
        workers=_workers(p),
        scheduler=ctx.scheduler,
        **p.settings_for(mod.ExtractConfig),
    )


def _plan(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    return mod.PlanConfig(
        objects=p.objects_dir,
        out=p.requests_dir,
        catalog=p.catalog,
        workers=_workers(p),
        scheduler=ctx.scheduler,
        **p.settings_for(mod.PlanConfig),
    )


def _fetch(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    kw = p.settings_for(mod.FetchConfig)
    if p.backend.type == "emulator":
        if ctx.emulator_url is None:
            raise ConfigError("the emulator is not running")  # run_pipeline starts it
        kw.update(backend="earthengine", ee_url=ctx.emulator_url, project=EMULATOR_PROJECT)
    else:
        kw["backend"] = p.backend.type
    return mod.FetchConfig(
        requests=p.requests_dir,
        out=p.dataset_dir,
        workers=_workers(p),
        scheduler=ctx.scheduler,
        catalog=p.catalog,
        **kw,
    )


def _caption(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    rules = p.caption.rules or p.caption.function
    return mod.CaptionConfig(
        dataset=p.dataset_dir,
        out=p.captions_csv,
        rules=rules,
        workers=_workers(p),
        scheduler=ctx.scheduler,
    )


def _filter(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    if p.filter is None:
        raise ConfigError(f"{p.path}: has no filter section (model, pretrained, ...)")
    return mod.FilterConfig(
        dataset=p.dataset_dir,
        captions=p.captions_csv,
        scheduler=ctx.scheduler,
        **p.settings_for(mod.FilterConfig),
    )


def _report(p: PipelineConfig, ctx: RunContext, mod: Any) -> Any:
    # the dataset is BUILD_DIR/dataset, the report's default (which may not exist yet)
    return mod.ReportConfig(build_dir=p.build_dir, out=p.report_dir)


def _built(build: Callable[[PipelineConfig, RunContext, Any], Any]) -> Callable[..., Any]:
    """A check that builds the stage's config (for configs that read no earlier stage's files)."""
    return lambda p, mod: build(p, RunContext(), mod)


def _check_caption(p: PipelineConfig, mod: Any) -> None:
    from ..files import check_out_file

    mod.resolve_rules(p.caption.rules or p.caption.function)
    check_out_file(p.captions_csv, "caption.csv")


STAGE_SPECS: dict[str, StageSpec] = {
    "extract": StageSpec(
        "skyscript_build.extract", "run_extract", _extract, dask="scheduler", check=_built(_extract)
    ),
    # plan's shards go to ctx.scheduler when the run has one (reusing the run's client), else
    # they run on threads in this process (never a LocalCluster of its own).
    "plan": StageSpec("skyscript_build.plan", "run_plan", _plan, check=_built(_plan)),
    "fetch": StageSpec("skyscript_build.fetch", "run_fetch", _fetch, dask="always"),
    "caption": StageSpec(
        "skyscript_build.caption", "run_caption", _caption, dask="always", check=_check_caption
    ),
    # filter's shards go to Dask only on an existing cluster (one model per worker, on its
    # GPU); locally it runs one process per visible GPU, or here on the CPU.
    "filter": StageSpec(
        "skyscript_build.filter", "run_filter", _filter, dask="scheduler", check=_built(_filter)
    ),
    "report": StageSpec("skyscript_build.report", "run_report", _report),
}
