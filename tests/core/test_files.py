"""The one atomic-write helper: a file or folder appears whole under its name, or not at all."""
import pytest

from slmquant.files import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomic(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_folder_is_replaced_whole(tmp_path):
    entry = tmp_path / "model"
    for files in (("a", "b"), ("c",)):
        with atomic_path(entry) as tmp:
            tmp.mkdir()
            for f in files:
                (tmp / f).write_text(f)
    assert sorted(p.name for p in entry.iterdir()) == ["c"] and len(list(tmp_path.iterdir())) == 1
