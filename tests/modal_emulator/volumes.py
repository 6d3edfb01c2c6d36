"""Modal Volumes as the emulator keeps them: one committed state per volume, a copy per container.

Modal's consistency model (modal/volume.py, `_Volume.commit` / `_Volume.reload`): a container
works on its own view of the volume; its writes reach other containers only when it commits,
and a running container sees others' commits only after it reloads. Uploads from outside a
container (`batch_upload`) land when the batch closes. Here the committed state is a folder, a
container's view is a private copy of it taken at start, and commit/reload move the differences.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

Stat = tuple[int, int]  # (size, mtime_ns); a folder is (-1, 0)
FOLDER: Stat = (-1, 0)


def scan(root: Path) -> dict[str, Stat]:
    """Every file and folder under `root` with its size and modification time."""
    out: dict[str, Stat] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            out[str((base / name).relative_to(root))] = FOLDER
        for name in filenames:
            info = (base / name).lstat()
            out[str((base / name).relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return out


class VolumeStore:
    """The committed state of every emulated volume, under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def committed(self, name: str) -> Path:
        """The folder holding `name`'s committed files (created on first use, as
        `Volume.from_name(..., create_if_missing=True)` does)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Path]:
        """The committed folder, with every other commit or snapshot of `name` held off."""
        committed = self.committed(name)
        with open(self.root / f".{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield committed

    # --- from outside a container (modal/volume.py: read_file, remove_file, batch_upload) ----
    def read_file(self, name: str, path: str) -> Iterator[bytes]:
        """The file's bytes; a missing file raises `FileNotFoundError` (`_Volume.read_file`)."""
        target = self.committed(name) / path.lstrip("/")
        if not target.is_file():
            raise FileNotFoundError(f"No such file: {path}")
        yield target.read_bytes()

    def remove_file(self, name: str, path: str, recursive: bool = False) -> None:
        """Remove a file (or, `recursive`, a folder); missing raises `FileNotFoundError`."""
        with self.locked(name) as committed:
            target = committed / path.lstrip("/")
            if target.is_dir() and recursive:
                shutil.rmtree(target)
            elif target.is_file():
                target.unlink()
            else:
                raise FileNotFoundError(f"No such file: {path}")

    def apply_upload(self, name: str, files: dict[str, bytes], force: bool) -> None:
        """Land a closed batch upload; without `force` an existing file is refused (as Modal)."""
        with self.locked(name) as committed:
            for path, data in files.items():
                target = committed / path.lstrip("/")
                if target.exists() and not force:
                    raise FileExistsError(f"{path} already exists; use force=True to overwrite")
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_name(f".{target.name}.upload")
                staging.write_bytes(data)
                staging.replace(target)

    # --- inside a container --------------------------------------------------------------------
    def snapshot(self, name: str, view: Path) -> dict[str, Stat]:
        """Fill `view` with the committed state; returns what the view held when taken."""
        with self.locked(name) as committed:
            shutil.copytree(committed, view, dirs_exist_ok=True, ignore=_lockfiles)
        return scan(view)

    def commit(self, name: str, view: Path, base: dict[str, Stat]) -> dict[str, Stat]:
        """Persist what this container changed since `base`; returns the new base."""
        now = scan(view)
        changed = sorted(p for p, s in now.items() if base.get(p) != s)
        gone = sorted((p for p in base if p not in now), reverse=True)
        with self.locked(name) as committed:
            for rel in changed:
                _copy(view / rel, committed / rel, now[rel])
            for rel in gone:
                _remove(committed / rel)
        return now

    def reload(self, name: str, view: Path, base: dict[str, Stat]) -> dict[str, Stat]:
        """Bring others' commits into `view`, keeping this container's uncommitted changes."""
        now = scan(view)
        mine = {p for p in set(now) | set(base) if now.get(p) != base.get(p)}
        with self.locked(name) as committed:
            theirs = scan(committed)
            for rel in sorted(set(theirs) - mine):
                if now.get(rel) != theirs[rel]:
                    _copy(committed / rel, view / rel, theirs[rel])
            for rel in sorted(set(now) - set(theirs) - mine, reverse=True):
                _remove(view / rel)
        fresh = scan(view)
        return {p: s for p, s in fresh.items() if p not in mine} | {
            p: base[p] for p in mine if p in base
        }


def _lockfiles(_folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(".") and n.endswith(".lock")]


def _copy(source: Path, target: Path, stat: Stat) -> None:
    if stat == FOLDER:
        target.mkdir(parents=True, exist_ok=True)
        return
    if target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.commit")
    shutil.copy2(source, staging)
    staging.replace(target)


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists() or target.is_symlink():
        target.unlink()


class BatchUpload:
    """What `Volume.batch_upload()` yields: files collected, landed when the block exits."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put_file(self, source: str | Path | io.BytesIO, path: str) -> None:
        """Queue one file (a local path or a file-like object) for `path` on the volume."""
        data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
        self.files[path] = data

    def put_directory(self, source: str | Path, path: str) -> None:
        """Queue every file under the local folder `source` below `path`."""
        for file in sorted(Path(source).rglob("*")):
            if file.is_file():
                self.put_file(file, f"{path.rstrip('/')}/{file.relative_to(source)}")
