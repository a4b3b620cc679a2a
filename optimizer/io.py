"""Atomic writes and content hashes: nothing a run folder holds is ever half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def stable_hash(value: Any, n: int = 16) -> str:
    """sha256 of a JSON-able value with sorted keys (tuples and lists hash alike)."""
    blob = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside `path`, fsync, then rename over it; on error nothing changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a temp folder beside `path`, then rename it into place (replacing an old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def source_hash() -> str:
    """sha256 over the source that decides what a rewritten program computes: the passes,
    the ops and their kernels, capture, the token-wise runner and the family adapters."""
    import astraea
    import astraea.passes
    import astraea.plugins

    roots = [Path(astraea.passes.__file__).parent, Path(astraea.plugins.__file__).parent]
    base = Path(astraea.__file__).parent
    files = [f for r in roots for f in sorted(r.rglob("*.py"))]
    files += [base / "capture.py", base / "tokenwise.py"] + sorted((base / "families").glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def read_json(path: Path, fix: str) -> Any:
    """A JSON file a stage wrote earlier; an unreadable or corrupt one is a one-line
    AstraeaError naming it and `fix` (e.g. "delete it to compute it again")."""
    from .errors import AstraeaError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AstraeaError(f"{path} cannot be read ({type(e).__name__}: {e}): {fix}") from None


def read_tensors(path: Path, fix: str, device: str = "cpu") -> dict:
    """A safetensors file a stage wrote earlier, as read_json."""
    from safetensors.torch import load_file

    from .errors import AstraeaError

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type for a corrupt header)
        raise AstraeaError(f"{path} cannot be read ({type(e).__name__}: {e}): {fix}") from None
