"""Issue 12, section 5: files written through atomic_write and the toy cache folders get the modes an
ordinary write would give (0o666 / 0o777 minus the umask), not mkstemp's 0600 / mkdtemp's 0700."""
import os
import stat

import pytest

from minipeft.safetensors_io import atomic_write
from minipeft.data import publish as _publish


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_an_ordinary_files_mode(tmp_path, umask_022):
    with atomic_write(tmp_path / "a.json", "w") as f:
        f.write("{}")
    with open(tmp_path / "b.json", "w") as f:  # what an ordinary write gives
        f.write("{}")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json") == 0o644
    os.umask(0o027)
    with atomic_write(tmp_path / "a.json", "w") as f:  # replacing a file: the umask now in force
        f.write("{}")
    assert mode(tmp_path / "a.json") == 0o640


def test_cache_folders_get_an_ordinary_folders_mode(tmp_path, umask_022):
    final = _publish(lambda tmp: (tmp / "done.json").write_text("{}"), tmp_path / "cache" / "toy-x")
    assert mode(final) == 0o755
    assert mode(final / "done.json") == 0o644


def test_atomic_write_removes_its_temp_file_when_close_fails(tmp_path, monkeypatch):
    """A full disk can make close() itself fail (buffered data flushed there): the temp file must go."""
    import io
    import pytest
    from minipeft.safetensors_io import atomic_write

    (tmp_path / "keep.json").write_text("old")
    real_close = io.BufferedWriter.close

    class FullDisk(io.BufferedWriter):
        def close(self):
            real_close(self)
            raise OSError(28, "No space left on device")

    import os
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(io.FileIO(fd, "w")))
    with pytest.raises(OSError, match="No space"):
        with atomic_write(tmp_path / "keep.json", "wb") as f:
            f.write(b"new")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
