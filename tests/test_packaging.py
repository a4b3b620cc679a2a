"""pyproject.toml ships every package of the source tree under the `astraea` name."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP = {"optimizer": "astraea", "passes": "astraea.passes", "plugins": "astraea.plugins"}


def test_every_source_package_is_listed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(tool["packages"]), tool["package-dir"]
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            package = ".".join([name, *rel.parts]) if rel.parts else name
            assert package in packages, f"{package} ({init.parent}) is missing from [tool.setuptools] packages"
            assert dirs[package] == str(init.parent.relative_to(ROOT)), package
    assert "*.safetensors" in tool["package-data"]["astraea.bundled"]
    assert not any(p.split(".")[0] != "astraea" for p in packages)  # no generic top-level names
