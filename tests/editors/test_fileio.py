import os
import stat

import pytest

from knowledger.editors import fileio


def test_atomic_write_mode_and_content(tmp_path):
    p = fileio.atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert p.read_text() == "hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [q.name for q in p.parent.iterdir()] == ["b.txt"]


def test_atomic_write_refuses_symlink_and_leaves_target(tmp_path):
    target = tmp_path / "important.txt"
    target.write_text("keep me")
    link = tmp_path / "ws" / "cache.bin"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(fileio.UnsafePath):
        fileio.atomic_write_bytes(link, b"x")
    assert target.read_text() == "keep me"
    assert sorted(q.name for q in link.parent.iterdir()) == ["cache.bin"]


def test_check_inside_refuses_symlinked_parent(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "artifacts").symlink_to(outside)
    with pytest.raises(fileio.UnsafePath):
        fileio.atomic_write_text(ws / "artifacts" / "x", "y", root=ws)
    assert not any(outside.iterdir())
    with pytest.raises(fileio.UnsafePath):
        fileio.check_inside(tmp_path / "elsewhere", ws)


def test_open_no_follow_never_truncates_a_symlink_target(tmp_path):
    target = tmp_path / "t"
    target.write_text("data")
    (tmp_path / "lock").symlink_to(target)
    with pytest.raises(fileio.UnsafePath):
        fileio.open_no_follow(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    assert target.read_text() == "data"


def test_atomic_dir_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(tmp_path / "out") as d:
            (d / "f").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with fileio.atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "f").stat().st_mode) == 0o644
    with pytest.raises(FileExistsError):
        with fileio.atomic_dir(tmp_path / "out"):
            pass
