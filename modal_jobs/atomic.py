"""Crash-safe writes: every artifact is built in a temporary sibling and renamed into place.

A process killed at any point leaves either the previous complete artifact or the new complete
one, never a mix: readers only ever see folders and files that were renamed in whole.

Test-only: `MOLE_TEST_PAUSE_AT=<point>@<marker file>` makes a process that reaches `<point>`
write the marker (JSON: the point, its pid and where it is) and pause there, so a test can
kill -9 it at a known moment. Points: `rename:<name>` once the artifact `<name>` is staged whole,
before its rename; `resume-point` during training, once a resume point is complete. Never set it
outside tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PAUSE_AT = "MOLE_TEST_PAUSE_AT"
# Long enough for any test to notice the marker and kill; a forgotten pause still ends.
PAUSE_SECONDS = 600


def _temp_sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` whole when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    staging = _temp_sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        pause_point(f"rename:{target.name}", staging=str(staging))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_orphans(target: Path) -> None:
    """Delete temporary siblings (folders, files) of `target` left by processes killed mid-write."""
    for sibling in target.parent.glob(f".{target.name}.*-*-*"):
        pid = sibling.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(source: Path, target: Path) -> None:
    """Move the complete folder `source` to `target`; an old `target` is swapped out atomically."""
    if not target.exists():
        os.replace(source, target)
        return
    if _exchange(source, target):
        shutil.rmtree(source, ignore_errors=True)
        return
    # No atomic exchange on this filesystem: a crash between these renames leaves `.old-*` behind.
    old = _temp_sibling(target, "old")
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return bool(result == 0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    _write_bytes(path, data, f"rename:{path.name}")


def _write_bytes(path: Path, data: bytes, point: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    staging = _temp_sibling(path, "tmp")
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if point is not None:
            pause_point(point, staging=str(staging))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def pause_point(point: str, **where: Any) -> None:
    """Test-only: write the marker and pause if `MOLE_TEST_PAUSE_AT` names `point` (see above)."""
    wanted, _, marker = os.environ.get(PAUSE_AT, "").partition("@")
    if wanted != point or not marker:
        return
    payload = {"point": point, "pid": os.getpid(), **where}
    _write_bytes(Path(marker), json.dumps(payload).encode(), None)
    time.sleep(PAUSE_SECONDS)


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically."""
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
