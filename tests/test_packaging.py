"""A plain (non-editable) install works: the wheel ships the imagery catalog's data file
beside ``image_sources.py`` and the package's data files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = """
import image_sources, skyscript_build, tag_filters
from pathlib import Path
site = Path(__import__("sys").argv[1]).resolve()
assert Path(image_sources.__file__).resolve().parent == site, image_sources.__file__
assert Path(skyscript_build.__file__).resolve().parent.parent == site
assert image_sources.get_source("FI").collection == "Finland/SMK/V/50cm"
assert len(image_sources.list_sources()) == 10
assert tag_filters.get_tag_filter_path("default").is_file()
print("ok")
"""


@pytest.mark.slow
def test_the_wheel_installs_a_working_catalog(tmp_path: Path):
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = tmp_path.glob("skyscript_build-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "image_sources.py" in names and "image_sources.yaml" in names
    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = [sys.executable, "-c", CHECK, str(site)]
    result = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
