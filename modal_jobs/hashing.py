"""Content hashes: the data versions that tie every artifact to exactly what produced it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def combine(parts: Iterable[str]) -> str:
    """One hash over an ordered sequence of strings (each length-prefixed, so unambiguous)."""
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def expert_version(expert_dir: Path) -> str:
    """Data version of one expert dataset: every file under `datasets/`, path and content."""
    root = expert_dir / "datasets"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return combine(f"{p.relative_to(root).as_posix()}:{file_sha256(p)}" for p in files)


def tree_version(root: Path) -> str:
    """Data version of a whole artifact folder."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return combine(f"{p.relative_to(root).as_posix()}:{file_sha256(p)}" for p in files)
