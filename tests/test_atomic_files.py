"""runtime/atomic_files.py: whole files replace atomically, logs tolerate a torn last line, temp
files of dead writers are swept, a full disk is a named error that leaves the old file."""

import errno
import json
import os
from pathlib import Path

import pytest
from cli_process import dead_pid

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.runtime import atomic_files
from megatron_minitron.training.metrics import read_metrics, truncate_after


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "scores.json"
    atomic_files.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_files.replacing(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_disk_full_is_a_named_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_files.write_text(path, "old\n")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(atomic_files.DiskFull) as e:
        atomic_files.write_text(path, "x" * 1000)
    monkeypatch.undo()
    assert isinstance(e.value, ConfigError) and e.value.field == "run.dir"
    assert "1,000 bytes" in str(e.value) and str(path) in str(e.value)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_torn_last_line_is_dropped_with_one_warning(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "lm_loss": 2.5}\n{"step": 2, "lm_loss": 2.4}\n{"step": 3, "lm')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "lm_loss": 2.5},
                                           {"step": 2, "lm_loss": 2.4}]
    err = capsys.readouterr().err
    assert err.count("torn last line") == 1 and str(log) in err
    # a resume from step 1 rewrites the log without the torn line and without step 2
    truncate_after(log, 1)
    assert log.read_text() == '{"step": 1, "lm_loss": 2.5}\n'


def test_a_damaged_line_in_the_middle_is_a_named_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"run.dir: .*metrics.jsonl line 2 is not JSON"):
        read_metrics(str(tmp_path))


def test_sweep_removes_temp_files_of_dead_writers_only(tmp_path):
    dead = dead_pid()
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f"stage.json{atomic_files.TMP_TAG}{dead}"
    stale_dir = tmp_path / f"step_0000004{atomic_files.TMP_TAG}{dead}"
    live = tmp_path / f"summary.json{atomic_files.TMP_TAG}{os.getpid()}"
    stale.write_text("{")
    stale_dir.mkdir()
    (stale_dir / "shard").write_text("x")
    live.write_text("{")
    keep = tmp_path / "notes.tmp-draft"
    keep.write_text("a user's file")
    removed = atomic_files.sweep_temp(tmp_path)
    assert sorted(removed) == sorted([stale, stale_dir])
    assert live.exists() and keep.exists() and not stale.exists() and not stale_dir.exists()


def test_remove_tree_hides_the_folder_before_deleting_it(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "step_0000002"
    folder.mkdir()
    (folder / "minitron.json").write_text("{}")
    seen = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: seen.append(Path(p)))
    atomic_files.remove_tree(folder)  # "killed" inside rmtree: nothing deleted yet
    assert not folder.exists() and seen and seen[0].name.startswith(
        "step_0000002" + atomic_files.TMP_TAG)
