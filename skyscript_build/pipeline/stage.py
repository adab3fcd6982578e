"""Pipeline files: one YAML file describes a whole dataset build; ``run_pipeline`` runs it.

``load_pipeline(path)`` (``skyscript_build.pipeline._config``) reads and validates the YAML into
a frozen ``PipelineConfig``; ``run_pipeline(config)`` runs the stages in order (extract, plan,
fetch, caption, filter, report), each from its own frozen config (``skyscript_build.pipeline._stages``)
and each resumable by itself. When the backend is the emulator, the run starts it for the fetch
and stops it after.

Dask: when the pipeline uses Dask (``cluster.scheduler`` or ``--scheduler``: an existing
cluster; ``cluster.workers`` other than 1: a LocalCluster), the run holds ONE client from the
first stage that runs on Dask to the last (``StageSpec.dask``: fetch and caption always,
extract only on an existing cluster), logs the dashboard link once, and gives those stages the
scheduler's address (their ``dask_client`` reuses the open client). The pipeline's image
sources (``PipelineConfig.catalog``) reach the workers inside the plan and fetch configs. Their shards are Dask tasks, retried on a lost worker.
Plan, and extract without a scheduler, use their own local pools; filter scores with one model
per visible GPU (or on the CPU) locally, and one model per worker on an existing cluster. On a cluster of several machines the build folder
must be on a filesystem that every worker sees under the same path.

Before any work, the run checks what every chosen stage needs from the user: input files,
backend paths, the settings each stage can judge without an earlier stage's files, and that the
build folder can be written. A run that fails leaves no empty folder it made, and
``pipeline.json`` (the settings that made the build, which the report reads) is written only
once a stage has succeeded (and before the report, its reader): a run that fails before any
stage succeeds leaves it as it was.

How paths and ``${VARIABLES}`` in a pipeline file resolve: ``skyscript_build.pipeline._config``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cluster import dask_client
from ..errors import ConfigError, InputError
from ..files import check_out_dir, leave_no_empty_folders, write_json_atomic
from ._config import DEMO_COLLECTIONS, STAGES, PipelineConfig
from ._stages import STAGE_SPECS, RunContext, stage_module

__all__ = ["StageOutcome", "PipelineResult", "select_stages", "run_pipeline"]

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """One stage's result (its own ``<Stage>Result``) and how long it took."""

    stage: str
    result: Any
    seconds: float

    def summary(self) -> str:
        """The stage's one-line summary."""
        line = self.result.summary() if hasattr(self.result, "summary") else str(self.result)
        return f"{line} [{self.seconds:.1f}s]"


@dataclass
class PipelineResult:
    """What a run did, stage by stage, and where its outputs are."""

    config: PipelineConfig
    outcomes: list[StageOutcome] = field(default_factory=list)

    def summary(self) -> str:
        """Where the dataset and the report are."""
        c = self.config
        text = f"pipeline {c.name}: dataset in {c.dataset_dir}"
        if (c.report_dir / "index.html").exists():
            text += f", report at {c.report_dir / 'index.html'}"
        return text


def select_stages(config: PipelineConfig, stages: Sequence[str] | None = None) -> list[str]:
    """The stages to run, in pipeline order (all of them when ``stages`` is empty).

    Without a ``filter:`` section the filter stage is left out of a full run, and asking for
    it is an error.
    """
    if not stages:
        return [s for s in STAGES if s != "filter" or config.filter is not None]
    for stage in stages:
        if stage not in STAGES:
            close = difflib.get_close_matches(stage, STAGES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown stage '{stage}'{hint} (stages: {', '.join(STAGES)})")
    if "filter" in stages and config.filter is None:
        raise ConfigError(f"{config.path}: has no filter section, so there is no filter stage")
    return [s for s in STAGES if s in set(stages)]


def _missing(config: PipelineConfig, key: str, path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{config.path}: {key}: {what} {path} not found (relative paths are relative to the "
        "current directory, or write ${PIPELINE_DIR}/...)"
    )


def _check_inputs(config: PipelineConfig, stages: Sequence[str]) -> None:
    """Check, before any work, the files the chosen stages need from the user."""
    if "extract" in stages:
        from ..extract import resolve_inputs

        for entry in config.input:
            try:
                files = resolve_inputs([entry])
            except InputError:
                files = []
            if not files or not all(f.is_file() for f in files):
                raise _missing(config, "input", entry, "OpenStreetMap file")
    if "fetch" not in stages:
        return
    b = config.backend
    if b.type == "earthengine" and b.key_file is not None and not b.key_file.is_file():
        raise _missing(config, "backend.key_file", b.key_file, "service-account key file")
    demo = (Path.cwd() / DEMO_COLLECTIONS).absolute()
    if b.type == "emulator" and b.collections != demo and not Path(str(b.collections)).is_file():
        raise _missing(config, "backend.collections", Path(str(b.collections)), "emulator file")
    if b.type == "raster" and not Path(b.location).is_dir():
        raise _missing(config, "backend.location", Path(b.location), "raster folder")


def _demo_collections(config: PipelineConfig) -> Path:
    """The emulator's collections file; the demo's own is made here when it is missing."""
    path = config.backend.collections
    assert path is not None  # required for the emulator backend
    if path.is_file():
        return path
    if path != (Path.cwd() / DEMO_COLLECTIONS).absolute():
        raise _missing(config, "backend.collections", path, "emulator collections file")
    try:
        from ..orthophoto import OrthophotoConfig, render_orthophoto
    except ImportError:
        raise ConfigError(
            f"{config.path}: backend.collections: {path} not found; run `make demo-data` first"
        ) from None
    log.info("making the demo's synthetic orthophoto (%s)", path.parent)
    log.info(
        "%s", render_orthophoto(OrthophotoConfig(pbf=config.input[0], out=path.parent)).summary()
    )
    if not path.is_file():
        raise ConfigError(f"{config.path}: backend.collections: {path} was not made")
    return path


def _emulator(config: PipelineConfig) -> Any:
    """The Earth Engine emulator for this run (not started yet)."""
    from ..emulator import Emulator, EmulatorConfig

    settings = {**config.settings_for(EmulatorConfig), "collections": _demo_collections(config)}
    return Emulator.from_config(EmulatorConfig(port=0, **settings))


def _named(config: PipelineConfig, stage: str, error: ConfigError) -> ConfigError:
    """A stage config's error, naming the pipeline file and the stage."""
    text = str(error)
    if not text.startswith(str(config.path)):
        text = f"{config.path}: {stage}: {text}"
    return ConfigError(text)


def _check_settings(config: PipelineConfig, stages: Sequence[str], modules: dict[str, Any]) -> None:
    """Check, before any work, each stage's settings that need no earlier stage's files."""
    check_out_dir(config.build_dir, f"{config.path}: build_dir")
    for stage in stages:
        check = STAGE_SPECS[stage].check
        if check is None:
            continue
        try:
            check(config, modules[stage])
        except ConfigError as e:
            raise _named(config, stage, e) from None


class _Snapshot:
    """``pipeline.json``: written when a stage has succeeded (or the report, which reads it,
    is next); put back as it was when the run fails before any stage succeeded."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.path = config.build_dir / "pipeline.json"
        self.before = self.path.read_bytes() if self.path.is_file() else None
        self.any_done = False

    def write(self) -> None:
        write_json_atomic(self.path, self.config.to_dict())

    def undo(self) -> None:
        if self.any_done:
            return
        if self.before is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file() and self.path.read_bytes() != self.before:
            self.path.write_bytes(self.before)


def _run_stage(config: PipelineConfig, stage: str, module: Any, ctx: RunContext) -> StageOutcome:
    spec = STAGE_SPECS[stage]
    try:
        stage_config = spec.build(config, ctx, module)
    except ConfigError as e:
        raise _named(config, stage, e) from None
    t0 = time.monotonic()
    stage_result = getattr(module, spec.entry)(stage_config)
    return StageOutcome(stage, stage_result, time.monotonic() - t0)


def _open_dask(config: PipelineConfig, stack: contextlib.ExitStack) -> str:
    """Open the run's Dask client (closed with ``stack``); its scheduler's address."""
    client = stack.enter_context(dask_client(config.cluster))
    return str(client.scheduler.address)


def run_pipeline(
    config: PipelineConfig,
    stages: Sequence[str] | None = None,
    scheduler: str | None = None,
    on_stage: Callable[[StageOutcome], None] | None = None,
) -> PipelineResult:
    """Run the chosen stages (all by default) of a pipeline, in order.

    Each stage is resumable by itself, so a rerun does only what is missing. When the backend
    is the emulator and fetch runs, the emulator is started on a free port of 127.0.0.1 for the
    run and stopped at its end.

    Args:
        config: a validated pipeline (``load_pipeline``).
        stages: stage names (``STAGES``); None or empty: every stage.
        scheduler: a Dask scheduler address, overriding the pipeline's ``cluster.scheduler``.
        on_stage: called with each stage's outcome as soon as the stage is done.

    Raises:
        ConfigError: an unknown or unavailable stage, a missing input, a bad setting (all
            checked before the first stage starts, as far as they can be).
    """
    chosen = select_stages(config, stages)
    modules = {s: stage_module(s, STAGE_SPECS[s].module) for s in chosen}
    _check_inputs(config, chosen)
    if scheduler:
        config = replace(config, cluster=replace(config.cluster, scheduler=scheduler))
    _check_settings(config, chosen, modules)
    scheduler_host = (config.cluster.scheduler or "").split("://")[-1].rsplit(":", 1)[0]
    if config.backend.type == "emulator" and scheduler_host not in ("", "127.0.0.1", "localhost"):
        log.warning(
            "the emulator listens on 127.0.0.1 only: Dask workers on other machines than this "
            "one (scheduler %s) cannot reach it",
            config.cluster.scheduler,
        )
    # depth 2: the stages' folders and, in the dataset, images{k}/, meta{k}/ and manifest/
    with leave_no_empty_folders(config.build_dir, depth=2):
        snapshot = _Snapshot(config)
        try:
            return _run_stages(config, chosen, modules, snapshot, on_stage)
        except BaseException:
            snapshot.undo()
            raise


def _run_stages(
    config: PipelineConfig,
    chosen: list[str],
    modules: dict[str, Any],
    snapshot: _Snapshot,
    on_stage: Callable[[StageOutcome], None] | None,
) -> PipelineResult:
    result = PipelineResult(config)
    on_dask = [s for s in chosen if STAGE_SPECS[s].on_dask(config.cluster)]
    address = config.cluster.scheduler
    with contextlib.ExitStack() as dask_stack:
        for stage in chosen:
            if on_dask and stage == on_dask[0]:
                address = _open_dask(config, dask_stack)
            ctx = RunContext(scheduler=address if stage in on_dask else config.cluster.scheduler)
            with contextlib.ExitStack() as stack:
                if stage == "fetch" and config.backend.type == "emulator":
                    ctx = replace(ctx, emulator_url=stack.enter_context(_emulator(config)).url)
                if stage == "report":  # it reads the settings of the build
                    snapshot.write()
                outcome = _run_stage(config, stage, modules[stage], ctx)
            snapshot.any_done = True
            if stage != "report":
                snapshot.write()
            if on_dask and stage == on_dask[-1]:
                dask_stack.close()  # the later stages need no cluster: free its memory
            result.outcomes.append(outcome)
            if on_stage is not None:
                on_stage(outcome)
    return result
