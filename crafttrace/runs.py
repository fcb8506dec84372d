"""Run directories: every stage reads and writes small typed records here, atomically.

A run directory holds JSON records (``boundary.json``, ``ranking.json``, ``ablation.json``, ...),
safetensors blobs, and a ``graphs/`` cache keyed by content hash. Writes go to a temporary file in
the same directory and are moved into place with ``os.replace`` so a killed run never leaves a
half-written record, and a rerun can trust whatever record it finds (that is how stages resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


@contextmanager
def _atomic(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (0644), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with _atomic(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"record not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    with _atomic(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tensor file not found: {path}")
    return load_file(str(path))


def identity_dict(cfg: Any, d: dict[str, Any], inert: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    """A config's dict ``d`` less the fields named in ``inert`` whose predicate says they sit at their no-effect
    setting: fields added after artifacts were cached stay out of cache keys until someone uses them."""
    return {k: v for k, v in d.items() if not (k in inert and inert[k](cfg))}


def content_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (model id, transcoder id, prompt, settings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(_jsonable(p), sort_keys=True).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of a model/transcoder directory: names, sizes and mtimes of its files."""
    path = Path(path)
    if not path.exists():
        return str(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return content_hash([(str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime)) for p in files])
