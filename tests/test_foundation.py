"""The foundation: the CLI's error contract, atomic writes, shard mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyscript_build.cluster import ClusterConfig, map_shards
from skyscript_build.files import atomic_path, atomic_write_bytes, remove_temp_files


def test_cli_help_lists_stages(cli):
    result = cli("--help")
    assert result.returncode == 0
    assert "extract -> plan -> fetch -> caption -> filter" in result.stdout


def test_cli_without_command_exits_2(cli):
    assert cli().returncode == 2


def test_atomic_write_leaves_no_temp_on_success(tmp_path: Path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_atomic_path_failure_keeps_old_file(tmp_path: Path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert remove_temp_files(tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def _square(x: int) -> int:
    return x * x


def test_map_shards_inline_keeps_order():
    assert map_shards(_square, [3, 1, 2], ClusterConfig(workers=1)) == [9, 1, 4]
