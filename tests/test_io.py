"""Atomic writes: the target is replaced whole or not at all (a SIGKILL mid-write: tests/test_checkpointing.py)."""

from __future__ import annotations

import pytest

from confspec_lightning.io import atomic_write_text, atomic_writer


def test_an_error_inside_the_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_text(target, "old")  # creates the directory
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_writer(target, "w") as handle:
            handle.write("half of the new conte")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    with atomic_writer(target) as handle:  # binary by default
        handle.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"mode='a' is not accepted; use 'wb' or 'w'"):
        with atomic_writer(tmp_path / "x", "a"):
            pass
