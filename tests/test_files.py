"""minillm.files: atomic writes that never lose the old file and never leave a temporary one."""

from __future__ import annotations

import pytest

from minillm.files import OutputError, atomic_dir, atomic_write, check_output


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "one")
    atomic_write(p, b"two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, broken)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_check_output_refuses_inputs_existing_and_empty(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("data")
    with pytest.raises(OutputError, match="also an input"):
        check_output(src, inputs=[src], overwrite=True)
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "x.txt", inputs=[tmp_path], overwrite=True)
    with pytest.raises(OutputError, match="exists"):
        check_output(src)
    with pytest.raises(OutputError, match="empty"):
        check_output("")
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "no" / "x.txt")
    assert check_output(src, overwrite=True) == src
    # A user's own file named like our old temporary scheme is never touched.
    (tmp_path / "out.txt.tmp").write_text("mine")
    atomic_write(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt.tmp").read_text() == "mine"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as d:
        (d / "a").write_text("1")
        (d / "b").write_text("1")
    with pytest.raises(OutputError, match="exists"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as d:
            (d / "a").write_text("2")
            raise RuntimeError("crash mid-export")
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"] and (out / "a").read_text() == "1"
    with atomic_dir(out, overwrite=True) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
