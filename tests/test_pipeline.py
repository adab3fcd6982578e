"""Pipeline files: validation with clear errors, the shipped pipelines, stage selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_fixture_script

from skyscript_build.errors import ConfigError
from skyscript_build.pipeline import (
    STAGES,
    StageOutcome,
    load_pipeline,
    run_pipeline,
    select_stages,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))
ENV = {"EE_PROJECT": "my-project", "DASK_SCHEDULER": "tcp://127.0.0.1:8786"}

MINIMAL = """\
name: mini
input: data/helsinki.osm.pbf
sources: [FI]
backend:
  type: emulator
  collections: build/demo-data/collections.yaml
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message  # every error names the file
    return message


def test_minimal_pipeline_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(write(tmp_path, MINIMAL))
    assert config.name == "mini"
    assert config.build_dir == tmp_path / "build" / "mini"  # build/<name>, cwd-relative
    assert config.input == (tmp_path / "data" / "helsinki.osm.pbf",)
    assert config.dataset_dir == config.build_dir / "dataset"
    assert config.captions_csv.name == "SkyScript_captions.csv"
    assert config.plan.given() == {}  # the plan stage's own defaults apply
    assert config.filter is None
    assert config.synthetic_imagery
    assert select_stages(config) == ["extract", "plan", "fetch", "caption", "report"]


def test_unknown_key_says_did_you_mean_with_line(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "plan:\n  min_pixels: 256\n")
    message = error_of(path)
    assert f"{path}:8: plan.min_pixels: unknown key; did you mean 'min_px'?" in message


def test_unknown_top_level_key(tmp_path: Path):
    message = error_of(write(tmp_path, MINIMAL + "sourcse_definitions: {}\n"))
    assert "sourcse_definitions: unknown key; did you mean 'source_definitions'?" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("plan:\n  min_px: ten\n", "plan.min_px: expected a whole number, got 'ten'"),
        ("plan:\n  min_px: 900\n  max_px: 300\n", "plan.min_px: 900 is larger than plan.max_px"),
        ("plan:\n  years: [2022, 2019]\n", "plan.years: 2022-2019 runs backwards"),
        ("output:\n  format: zip\n", "output.format: 'zip' is not one of files, webdataset"),
        ("output:\n  parts: 0\n", "output.parts: must be at least 1, got 0"),
        ("cluster:\n  workers: -1\n", "cluster.workers: must be at least 0"),
        (
            "filter:\n  model: ViT-B-32\n  pretrained: none\n  top: [0.3, 1.5]\n",
            "filter.top.1: must be at most 1",
        ),
        ("filter:\n  model: ViT-B-32\n", "filter.pretrained: is required"),
        ("seed: true\n", "seed: expected a whole number, got the boolean true"),
        ("tag_filter: [a]\n", "tag_filter: expected text, got a list"),
    ],
)
def test_bad_values(tmp_path: Path, extra: str, expected: str):
    assert expected in error_of(write(tmp_path, MINIMAL + extra))


def test_backend_keys_belong_to_their_type(tmp_path: Path):
    text = MINIMAL.replace("  type: emulator", "  type: emulator\n  project: x")
    message = error_of(write(tmp_path, text))
    assert "backend.project: is a setting of backend type earthengine, not of 'emulator'" in message
    text = MINIMAL.replace("type: emulator", "type: earthengin")
    assert "did you mean 'earthengine'?" in error_of(write(tmp_path, text))


def test_unknown_source_alias(tmp_path: Path):
    message = error_of(write(tmp_path, MINIMAL.replace("[FI]", "[FI, SS2]")))
    assert "sources.1: unknown image source 'SS2'; did you mean 'S2'?" in message


def test_source_definitions_add_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import image_sources

    monkeypatch.chdir(tmp_path)
    text = MINIMAL.replace("[FI]", "[FI, MYXYZ]") + (
        "source_definitions:\n"
        "  MYXYZ:\n"
        "    gsd: 0.3\n"
        "    years: [2020]\n"
        "    backend: xyz\n"
        "    location: http://127.0.0.1:1/{z}/{x}/{y}.png\n"
    )
    config = load_pipeline(write(tmp_path, text))
    assert config.sources == ("FI", "MYXYZ")
    assert config.catalog.get_source("MYXYZ").gsd == 0.3
    assert "MYXYZ" not in image_sources.list_sources(), "a pipeline changes no other catalog"
    bad = MINIMAL + "source_definitions:\n  NEW:\n    gsd: 1\n"
    assert "source_definitions.NEW:" in error_of(write(tmp_path, bad))


def test_a_pipeline_that_overrides_a_builtin_source_leaves_it_alone(tmp_path: Path):
    """Validating a pipeline makes its own catalog: the built-in FI is the same afterwards,
    for this process and for the next pipeline loaded."""
    import image_sources

    before = image_sources.get_source("FI")
    text = MINIMAL + "source_definitions:\n  FI:\n    years: [2019]\n    gsd: 0.25\n"
    config = load_pipeline(write(tmp_path, text))
    assert (config.catalog.get_source("FI").gsd, config.catalog.get_source("FI").years) == (
        0.25,
        (2019,),
    )
    assert image_sources.get_source("FI") is before
    assert load_pipeline(write(tmp_path, MINIMAL, "q.yaml")).catalog.get_source("FI") is before
    assert "catalog" not in config.to_dict()  # pipeline.json keeps source_definitions only


def test_unset_variable_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("EE_PROJECT", raising=False)
    text = MINIMAL.replace(
        "  type: emulator\n  collections: build/demo-data/collections.yaml",
        "  type: earthengine\n  project: ${EE_PROJECT}",
    )
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path}:6: backend.project: environment variable EE_PROJECT is not set" in message
    monkeypatch.setenv("EE_PROJECT", "proj-1")
    assert load_pipeline(path).backend.project == "proj-1"


def test_pipeline_dir_variable(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("data/helsinki", "${PIPELINE_DIR}/in/helsinki"))
    assert load_pipeline(path).input == (tmp_path / "in" / "helsinki.osm.pbf",)


def test_input_as_a_list_or_a_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Several OSM inputs: a list, a folder or a glob (checked before any stage runs)."""
    monkeypatch.chdir(tmp_path)
    listed = MINIMAL.replace("input: data/helsinki.osm.pbf", "input: [a.osm.pbf, b/]")
    assert load_pipeline(write(tmp_path, listed)).input == (tmp_path / "a.osm.pbf", tmp_path / "b")
    globbed = MINIMAL.replace("data/helsinki.osm.pbf", "'regions/*.osm.pbf'")
    config = load_pipeline(write(tmp_path, globbed))
    assert config.input == (tmp_path / "regions" / "*.osm.pbf",)
    with pytest.raises(ConfigError, match=r"input: OpenStreetMap file .*regions/\*.osm.pbf"):
        run_pipeline(config, stages=["extract"])
    assert "lists" in error_of(
        write(tmp_path, MINIMAL.replace("input: data/helsinki.osm.pbf", "input: [a, a]"))
    )


def test_yaml_syntax_and_duplicates(tmp_path: Path):
    assert "not valid YAML" in error_of(write(tmp_path, MINIMAL + "plan: [\n"))
    assert "p.yaml:7: name: key given twice" in error_of(write(tmp_path, MINIMAL + "name: b\n"))
    assert "pipeline file not found" in error_of(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pipelines_validate(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    config = load_pipeline(path)
    assert config.name == path.stem
    assert config.build_dir == REPO / "build" / path.stem
    assert config.filter is not None
    json.dumps(config.to_dict())  # what run writes to pipeline.json


def test_shipped_pipelines_are_the_promised_ones(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    names = {p.stem for p in SHIPPED}
    assert {"demo_helsinki", "switzerland", "usa_naip", "skyscript_global"} <= names
    demo = load_pipeline(REPO / "pipelines" / "demo_helsinki.yaml")
    assert demo.sources == ("FI",) and demo.backend.type == "emulator"
    assert demo.input == (REPO / "data" / "helsinki.osm.pbf",) and demo.input[0].is_file()
    assert demo.filter is not None and demo.filter.random_weights
    world = load_pipeline(REPO / "pipelines" / "skyscript_global.yaml")
    assert sorted(world.sources) == sorted(
        ["US", "DE", "FI", "CH", "ES", "P3", "P5", "S2", "L8", "L9"]
    )
    assert world.cluster.scheduler == ENV["DASK_SCHEDULER"]
    for name in ("switzerland", "usa_naip"):
        config = load_pipeline(REPO / "pipelines" / f"{name}.yaml")
        assert config.backend.type == "earthengine" and config.backend.project == "my-project"
        assert config.backend.key_file is None  # EE_KEY_FILE unset: default credentials


def test_stage_selection_keeps_pipeline_order(tmp_path: Path):
    config = load_pipeline(write(tmp_path, MINIMAL + "filter: {model: m, pretrained: none}\n"))
    assert select_stages(config) == list(STAGES)
    assert select_stages(config, ["report", "plan", "plan"]) == ["plan", "report"]
    with pytest.raises(ConfigError, match="unknown stage 'fetc'; did you mean 'fetch'"):
        select_stages(config, ["fetc"])
    no_filter = load_pipeline(write(tmp_path, MINIMAL, "q.yaml"))
    with pytest.raises(ConfigError, match="has no filter section"):
        select_stages(no_filter, ["filter"])


def test_run_only_report_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(write(tmp_path, MINIMAL))  # its input does not exist: not needed
    seen: list[StageOutcome] = []
    result = run_pipeline(config, stages=["report"], on_stage=seen.append)
    assert [o.stage for o in result.outcomes] == ["report"] == [o.stage for o in seen]
    assert (config.report_dir / "index.html").is_file()
    snapshot = json.loads((config.build_dir / "pipeline.json").read_text())
    assert snapshot["backend"]["type"] == "emulator"
    assert not (config.build_dir / "objects").exists()  # no other stage ran


def test_cli_run_missing_input_exits_2(tmp_path: Path, cli):
    path = write(tmp_path, MINIMAL)
    result = cli("run", path, "--stage", "extract", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert (
        "input: OpenStreetMap file" in result.stderr
        and "helsinki.osm.pbf not found" in result.stderr
    )
    assert not (tmp_path / "build" / "mini").exists()  # no partial output


def test_a_failed_run_leaves_no_pipeline_json_nor_empty_folders(tmp_path: Path, cli):
    path = write(tmp_path, MINIMAL)
    result = cli("run", path, "--stage", "plan", cwd=tmp_path)  # no objects yet
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "build").exists()
    # a build that has its settings already keeps them as they were
    build = tmp_path / "build" / "mini"
    build.mkdir(parents=True)
    (build / "pipeline.json").write_text('{"name": "before"}')
    result = cli("run", path, "--stage", "plan", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (build / "pipeline.json").read_text() == '{"name": "before"}'
    assert sorted(p.name for p in build.iterdir()) == ["pipeline.json"]


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("caption:\n  rules: no_such_rules.yaml\n", "caption: no_such_rules.yaml: caption rules"),
        ("plan:\n  years: [2030, 2031]\n", "plan: image source FI has no imagery in 2030-2031"),
        ("build_dir: a_file/build\n", "a_file is a file, not a folder"),
    ],
)
def test_settings_of_later_stages_are_checked_before_any_work(
    tmp_path: Path, cli, extra: str, expected: str
):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "helsinki.osm.pbf").write_bytes(
        (REPO / "data/helsinki.osm.pbf").read_bytes()
    )
    (tmp_path / "a_file").write_text("x")
    path = write(tmp_path, MINIMAL + extra)
    before = sorted(tmp_path.rglob("*"))
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and expected in result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # extract never started


def test_cli_run_bad_pipeline_exits_2(tmp_path: Path, cli):
    path = write(tmp_path, MINIMAL + "plan:\n  max_pix: 3\n")
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2
    assert "plan.max_pix: unknown key; did you mean 'max_px'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_run_unknown_stage_exits_2(tmp_path: Path, cli):
    result = cli("run", write(tmp_path, MINIMAL), "--stage", "fetc", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'fetc'" in result.stderr


def test_missing_stage_module_is_a_clear_error():
    from skyscript_build.pipeline._stages import stage_module

    with pytest.raises(ConfigError, match="^stage polish2 is not available in this version$"):
        stage_module("polish2", "skyscript_build.polish2")
    assert stage_module("report", "skyscript_build.report").run_report


def test_run_holds_one_dask_client_for_its_dask_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import logging

    from distributed import default_client

    from skyscript_build.caption import CaptionConfig, run_caption

    data = load_fixture_script("caption")
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(write(tmp_path, MINIMAL + "cluster:\n  workers: 2\n"))
    data.make_dataset(config.dataset_dir)
    caplog.set_level(logging.INFO)
    result = run_pipeline(config, stages=["caption", "report"])
    caption = result.outcomes[0].result
    # The chunks ran on the LocalCluster's worker processes, not here.
    assert caption.chunks_by_worker and all(
        w.startswith("tcp://127.0.0.1:") for w in caption.chunks_by_worker
    )
    local = tmp_path / "local.csv"
    run_caption(CaptionConfig(dataset=config.dataset_dir, out=local, workers=1))
    assert config.captions_csv.read_bytes() == local.read_bytes()
    dashboards = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("skyscript_build") and "dashboard" in r.getMessage()
    ]
    assert len(dashboards) == 1 and "local cluster of 2 workers" in dashboards[0]
    with pytest.raises(ValueError):
        default_client()  # closed after the last stage on Dask


def test_which_stages_run_on_the_runs_dask_client():
    from skyscript_build.cluster import ClusterConfig
    from skyscript_build.pipeline._stages import STAGE_SPECS

    def on_dask(cluster: ClusterConfig) -> list[str]:
        return [s for s in STAGES if STAGE_SPECS[s].on_dask(cluster)]

    assert on_dask(ClusterConfig(workers=1)) == []
    assert on_dask(ClusterConfig(workers=2)) == ["fetch", "caption"]  # a LocalCluster
    remote = ClusterConfig(scheduler="tcp://127.0.0.1:8786")
    assert on_dask(remote) == ["extract", "fetch", "caption", "filter"]  # one model per worker
