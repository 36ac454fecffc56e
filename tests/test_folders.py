import os

import pytest

from ghist._folders import replaced_file


def test_replaced_file_moves_in_only_on_success(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def crash_while_writing():
        with replaced_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        crash_while_writing()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left

    with replaced_file(path) as tmp:
        assert tmp.parent == tmp_path
        assert tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
