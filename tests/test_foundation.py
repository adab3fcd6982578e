"""The foundation: the CLI's error contract, atomic writes, shard mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyscript_build.errors import ConfigError
from skyscript_build.files import (
    atomic_path,
    atomic_write_bytes,
    check_out_dir,
    check_out_file,
    leave_no_empty_folders,
    remove_temp_files,
)


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


def test_a_failed_block_leaves_no_folder_it_made_empty(tmp_path: Path):
    (tmp_path / "old" / "kept").mkdir(parents=True)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt), leave_no_empty_folders(out, tmp_path / "old", depth=2):
        (out / "images2").mkdir(parents=True)
        (out / "meta2" / "x").mkdir(parents=True)
        (tmp_path / "old" / "made").mkdir()
        raise KeyboardInterrupt
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["old", "old/kept"]
    # what the block wrote stays, and so do the folders holding it
    with pytest.raises(RuntimeError), leave_no_empty_folders(out, depth=1):
        (out / "images2").mkdir(parents=True)
        (out / "meta2").mkdir()
        (out / "meta2" / "done.pickle").write_bytes(b"x")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["meta2"]
    # a block that succeeds keeps its empty folders
    with leave_no_empty_folders(tmp_path / "ok"):
        (tmp_path / "ok" / "empty").mkdir(parents=True)
    assert (tmp_path / "ok" / "empty").is_dir()


def test_output_paths_are_checked_before_work(tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    check_out_dir(tmp_path / "new" / "folder")
    check_out_file(tmp_path / "new" / "x.csv")
    with pytest.raises(ConfigError, match=r"^--out .*a_file: is a file, not a folder$"):
        check_out_dir(tmp_path / "a_file")
    with pytest.raises(ConfigError, match=r"a_file is a file, not a folder$"):
        check_out_dir(tmp_path / "a_file" / "sub", "--out")
    with pytest.raises(ConfigError, match=r"^--csv .*: is a folder; give a file name$"):
        check_out_file(tmp_path, "--csv")
    with pytest.raises(ConfigError, match="a_file is a file"):
        check_out_file(tmp_path / "a_file" / "x.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
