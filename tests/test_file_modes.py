"""Issue 12, section 5: files written through atomic_write and the toy cache folders get the modes an
ordinary write would give (0o666 / 0o777 minus the umask), not mkstemp's 0600 / mkdtemp's 0700."""
import os
import stat

import pytest

from minipeft.safetensors_io import atomic_write
from minipeft.toy import _publish


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
