"""Atomic writes: permissions and interrupted writes."""

import os
import stat

import pytest

from rwkv_mlx._files import write_atomically


def test_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "out.bin", lambda f: f.write(b"data"))
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_interrupted_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(f):
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, fail, text=True)

    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
