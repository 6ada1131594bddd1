"""Output files: checked before a run, written whole or not at all."""
from __future__ import annotations

import os

import pytest

from avarc import AvarcError
from avarc.io.files import _umask, absolute, atomic_write, check_output_file, make_output_dir


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "out.png"
    f.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(f) as tmp:
            tmp.write(b"half of the new")
            raise KeyboardInterrupt
    assert f.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.png"]
    with atomic_write(f) as tmp:
        tmp.write(b"new")
    assert f.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.png"]
    with atomic_write(tmp_path / "fresh.png") as tmp:
        tmp.write(b"x")
    assert (tmp_path / "fresh.png").stat().st_mode & 0o777 == 0o666 & ~_umask()      # as open() would make it


def test_output_paths_that_cannot_be_written_fail_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for path, says in [(tmp_path / "dir", "is a folder; give a file name"),
                       (tmp_path / "file" / "r.jsonl", "is a file, not a folder"),
                       (tmp_path / "file" / "deeper" / "r.jsonl", "is a file, not a folder"),
                       (tmp_path / "fifo", "not a regular file")]:
        with pytest.raises(AvarcError, match=says):
            check_output_file(path, "--out")
    with pytest.raises(AvarcError, match="already exists; set force=True"):
        check_output_file(tmp_path / "file", "--out", force=False)
    assert check_output_file(tmp_path / "file", "--out", force=True) == tmp_path / "file"
    assert check_output_file(tmp_path / "new" / "r.jsonl", "--out") == tmp_path / "new" / "r.jsonl"
    with pytest.raises(AvarcError, match="is a file, not a folder"):
        make_output_dir(tmp_path / "file", "--out")
    with pytest.raises(AvarcError, match="is a file, not a folder"):
        make_output_dir(tmp_path / "file" / "sub", "--out")
    assert make_output_dir(tmp_path / "a" / "b", "--out").is_dir()


def test_a_symlink_loop_has_an_absolute_key_instead_of_an_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert absolute(tmp_path / "a") == tmp_path.resolve() / "a"
