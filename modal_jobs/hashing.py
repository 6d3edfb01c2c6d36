"""Content hashes: the data versions that tie every artifact to exactly what produced it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modal_jobs.atomic import write_bytes

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
    return FileHashIndex().scan(expert_dir).version


@dataclass(frozen=True)
class ExpertScan:
    """One pass over an expert's files: its version and what the pass had to do."""

    version: str
    files: int
    rehashed: int
    newest_mtime: float


class FileHashIndex:
    """Per-file (size, mtime, sha256) memory, optionally persisted as JSON.

    A scan stats every file but re-hashes only files whose size or mtime changed, so checking
    100,000 unchanged files costs directory walks and stats, not reads.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            self.entries = json.loads(path.read_text())

    def scan(self, expert_dir: Path) -> ExpertScan:
        """Version of `expert_dir/datasets/**` (same formula as `expert_version`)."""
        root = expert_dir / "datasets"
        parts: list[str] = []
        rehashed = 0
        newest = 0.0
        for relative, full in _walk(root):
            stat = full.stat()
            newest = max(newest, stat.st_mtime)
            digest, fresh = self._sha(full, stat.st_size, stat.st_mtime_ns)
            rehashed += fresh
            parts.append(f"{relative}:{digest}")
        return ExpertScan(combine(parts), len(parts), rehashed, newest)

    def _sha(self, path: Path, size: int, mtime_ns: int) -> tuple[str, int]:
        key = str(path)
        known = self.entries.get(key)
        if known is not None and known[0] == size and known[1] == mtime_ns:
            return str(known[2]), 0
        digest = file_sha256(path)
        self.entries[key] = [size, mtime_ns, digest]
        self.dirty = True
        return digest, 1

    def save(self) -> None:
        """Persist the index (atomically) if it changed."""
        if self.path is not None and self.dirty:
            write_bytes(self.path, json.dumps(self.entries).encode())
            self.dirty = False


def _walk(root: Path) -> list[tuple[str, Path]]:
    """(posix path relative to root, path) of every file below root, sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for folder, _, names in os.walk(root):
        base = Path(folder)
        prefix = base.relative_to(root).as_posix()
        for name in names:
            relative = name if prefix == "." else f"{prefix}/{name}"
            found.append((relative, base / name))
    found.sort()
    return found
