"""Stand-ins for Modal's cloud (which tests cannot reach), and `modal run` with them substituted.

Run as `python tests/modal_substituted.py modal_jobs/mole_app.py::<entrypoint>` in place of
`modal run …`: it imports the real app, swaps each `modal.Function` for its local body
(`Function.local`) and the data `modal.Volume` for a folder, then calls the real entrypoint.
`MOLE_TEST_MOUNTS` (JSON) maps each container mount path (`/vol/<name>`) to a local folder.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from modal.exception import NotFoundError

MOUNTS_ENV = "MOLE_TEST_MOUNTS"


def remap(value: Any, mounts: dict[str, str]) -> Any:
    """`value` with every container path under a mount replaced by its local folder."""
    if isinstance(value, dict):
        return {k: remap(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, mounts) for v in value]
    if isinstance(value, str):
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return local + value[len(mount) :]
    return value


class LocalBody:
    """A `modal.Function` with `.remote` / `.map` running its body here, mounts remapped."""

    def __init__(self, function: Any, mounts: dict[str, str], calls: list[Any]) -> None:
        self.function, self.mounts, self.calls = function, mounts, calls

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.function.local(*remap(list(args), self.mounts))

    def map(self, *iterables: Iterable[Any]) -> Iterator[Any]:
        return iter([self.remote(*args) for args in zip(*iterables, strict=True)])


class FolderVolume:
    """The `modal.Volume` calls `cloud.upload_tree` makes, on a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploaded: list[str] = []

    def read_file(self, path: str) -> Iterator[bytes]:
        target = self.root / path
        if not target.is_file():
            raise NotFoundError(f"{path} not found")
        yield target.read_bytes()

    def remove_file(self, path: str, recursive: bool = False) -> None:
        (self.root / path).unlink()

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[FolderVolume]:
        yield self

    def put_file(self, source: Path | io.BytesIO, path: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, io.BytesIO):
            target.write_bytes(source.getvalue())
        else:
            shutil.copyfile(source, target)
        self.uploaded.append(path)


def main(func_ref: str) -> None:
    """Run the entrypoint `func_ref` names with the cloud substituted."""
    path, entrypoint = func_ref.split("::")
    app = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    mounts = json.loads(os.environ[MOUNTS_ENV])
    calls: list[Any] = []
    for name, function in list(app.REMOTES.items()):
        if name != "data_volume":
            app.REMOTES[name] = LocalBody(function, mounts, calls)
    app.REMOTES["data_volume"] = FolderVolume(Path(mounts["/vol/moe-lora-data"]))
    getattr(app, entrypoint)()  # the LocalEntrypoint object calls the entrypoint's body
    calls_dir = os.environ.get("MOLE_TEST_CALLS")
    if calls_dir:  # what the entrypoint sent to the cloud, for the tests to inspect
        record = Path(calls_dir) / f"{entrypoint}.json"
        record.write_text(json.dumps([list(c) for c in calls], default=str))


if __name__ == "__main__":
    main(sys.argv[1])
