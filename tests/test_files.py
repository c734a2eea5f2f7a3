"""Folders written whole or not at all (``hf_kd.files.write_atomic_dir``), as the teacher cache and the
demo data writers use it."""

import os
import stat

import pytest

import hf_kd.data.toy_chat as toy_chat
import hf_kd.files
from hf_kd.files import write_atomic_dir


def write_files(**contents):
    """A ``write`` callback that writes ``name: text`` files into the folder it is given."""

    def write(folder):
        for name, text in contents.items():
            (folder / name).write_text(text)

    return write


def test_a_new_folder_replaces_the_old_one_whole_and_is_readable_by_everyone(tmp_path):
    target = tmp_path / "sub" / "data"
    assert write_atomic_dir(target, write_files(a="1", b="2")) == target
    write_atomic_dir(target, write_files(c="3"))
    assert sorted(p.name for p in target.iterdir()) == ["c"] and (target / "c").read_text() == "3"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["data"]  # no temporary folder left


def test_a_failed_write_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    target = tmp_path / "data"
    write_atomic_dir(target, write_files(old="kept"))

    def fail(folder):
        (folder / "new").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic_dir(target, fail)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in target.iterdir()] == ["old"] and (target / "old").read_text() == "kept"


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The old folder is renamed aside before the new one takes its name; if that second rename fails
    the old folder is renamed back."""
    target = tmp_path / "data"
    write_atomic_dir(target, write_files(old="kept"))
    renames, rename = [], os.replace

    def replace(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst)))
        if len(renames) == 2:
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(hf_kd.files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_atomic_dir(target, write_files(new="lost"))
    monkeypatch.undo()
    assert renames[0][0] == "data" and renames[1][1] == "data" and renames[2][1] == "data"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in target.iterdir()] == ["old"]


def test_a_demo_data_writer_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    """``write_toy_chat`` fails while saving its tokenizer: neither the dataset nor a staging folder
    is left in the parent folder."""

    def no_tokenizer(texts):
        raise RuntimeError("tokenizer training failed")

    monkeypatch.setattr(toy_chat, "toy_tokenizer", no_tokenizer)
    with pytest.raises(RuntimeError, match="tokenizer training failed"):
        toy_chat.write_toy_chat(tmp_path / "toy_chat", num_train=4, num_test=2)
    assert list(tmp_path.iterdir()) == []
