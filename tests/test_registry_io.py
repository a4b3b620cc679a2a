"""The registry and the atomic writers."""

from __future__ import annotations

import json

import pytest

from astraea.errors import AstraeaError
from astraea.families import FAMILIES
from astraea.io import atomic_dir, atomic_file, stable_hash, write_json
from astraea.registry import Registry


def test_registry_miss_lists_names_and_snapshot_restores():
    reg: Registry[int] = Registry("backend")
    reg.register("b")(2)
    reg.register("a")(1)
    with pytest.raises(AstraeaError, match="unknown backend 'c'; valid: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(3)
    with reg.snapshot():
        reg.register("c")(3)
        assert reg.get("c") == 3
    assert reg.names() == ["a", "b"]


def test_builtin_families():
    assert FAMILIES.names() == ["cogvideox", "hunyuan_video", "opensora", "wan"]


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(path) as fh:
            fh.write("{half")
            raise RuntimeError
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "two").write_text("2")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["one"]
    with atomic_dir(target) as tmp:
        (tmp / "three").write_text("3")
    assert [p.name for p in target.iterdir()] == ["three"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_stable_hash():
    assert stable_hash({"a": [1, 2], "b": 1}) == stable_hash({"b": 1, "a": (1, 2)})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
