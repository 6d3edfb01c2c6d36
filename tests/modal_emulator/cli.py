"""`modal run FILE::ENTRYPOINT [--arg value ...]` against the emulated cloud.

Installed as the `modal` executable first on PATH (`Cloud.shim()`), so `dagster_modal.ModalClient`
launches it unchanged. As the real CLI does (modal/cli/import_refs.py `import_file_or_module`),
it puts the working directory and the file's folder on `sys.path` and imports the file under its
own module name; then, as `modal run` creates the app (every function, each image built and each
secret resolved), it checks each function's image and secrets, and calls the local entrypoint in
this process. Only the client's calls into the cloud are swapped: `Function.remote` / `.map` and
the `Volume` methods a client uses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .cloud import Cloud, Declared
from .image import ImageDefinition
from .volumes import BatchUpload

DECLARED: dict[str, Declared] = {}


def _record_declarations() -> None:
    import modal

    original_function, original_cls = modal.App.function, modal.App.cls

    def function(self: Any, *args: Any, **options: Any) -> Any:
        decorate = original_function(self, *args, **options)

        def wrapper(raw: Any) -> Any:
            created = decorate(raw)
            info = created._get_source_info()
            DECLARED[info.function_name] = Declared(
                info.function_name, str(info.module_name), Path(info._file), options
            )
            return created

        return wrapper

    def cls(self: Any, *args: Any, **options: Any) -> Any:
        decorate = original_cls(self, *args, **options)

        def wrapper(raw: Any) -> Any:
            created = decorate(raw)
            user = created._get_user_cls()
            DECLARED[user.__name__] = Declared(
                user.__name__, user.__module__, Path(inspect.getfile(user)), options
            )
            return created

        return wrapper

    modal.App.function = function  # type: ignore[method-assign]
    modal.App.cls = cls  # type: ignore[method-assign]


def _import_app(path: str) -> Any:
    sys.path.insert(0, "")
    full = Path(path).resolve()
    sys.path.insert(0, str(full.parent))
    name = inspect.getmodulename(path)
    assert name is not None
    spec = importlib.util.spec_from_file_location(name, full)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _create_app(cloud: Cloud) -> None:
    """What `modal run` does before the entrypoint: build every image, resolve every secret."""
    import modal.exception

    for declared in DECLARED.values():
        ImageDefinition.of(declared.options["image"]).check_builds()
        for secret in declared.options.get("secrets") or ():
            if secret.name not in cloud.secrets():
                raise modal.exception.NotFoundError(
                    f"Secret {secret.name!r} not found in environment 'main'"
                )


def client_methods(cloud: Cloud) -> list[tuple[type, str, Any]]:
    """(class, attribute, replacement) for every client call into the cloud."""
    import modal

    def declared(function: Any) -> Declared:
        return DECLARED[function._get_source_info().function_name]

    def remote(self: Any, *args: Any, **kwargs: Any) -> Any:
        return cloud.call(declared(self), args, kwargs)

    def map_(self: Any, *iterables: Iterable[Any], **_: Any) -> Iterator[Any]:
        return cloud.map(declared(self), iterables)

    def read_file(self: Any, path: str) -> Iterator[bytes]:
        return cloud.store.read_file(self.name, path)

    def remove_file(self: Any, path: str, recursive: bool = False) -> None:
        cloud.store.remove_file(self.name, path, recursive)

    @contextlib.contextmanager
    def batch_upload(self: Any, force: bool = False) -> Iterator[BatchUpload]:
        batch = BatchUpload()
        yield batch
        cloud.store.apply_upload(self.name, batch.files, force)

    def outside(self: Any) -> None:
        # modal/volume.py: "Must be called inside a container that mounts the Volume."
        raise RuntimeError(f"Volume {self.name!r}: commit/reload only work inside a container")

    return [
        (modal.Function, "remote", remote),
        (modal.Function, "map", map_),
        (modal.Volume, "read_file", read_file),
        (modal.Volume, "remove_file", remove_file),
        (modal.Volume, "batch_upload", batch_upload),
        (modal.Volume, "commit", outside),
        (modal.Volume, "reload", outside),
    ]


def load_app(path: str) -> tuple[Any, dict[str, Declared]]:
    """Import an app file as `modal run` does; returns it and its functions' declarations."""
    _record_declarations()
    return _import_app(path), DECLARED


def _arguments(argv: list[str]) -> dict[str, str]:
    pairs = zip(argv[::2], argv[1::2], strict=True)
    return {key.removeprefix("--").replace("-", "_"): value for key, value in pairs}


def main(root: str, argv: list[str]) -> int:
    """Run `modal run FILE::ENTRYPOINT [--name value ...]`; exit status as the real CLI's."""
    if len(argv) < 2 or argv[0] != "run" or "::" not in argv[1]:
        print("emulated modal: only `modal run FILE.py::ENTRYPOINT` is supported", file=sys.stderr)
        return 2
    path, entrypoint = argv[1].split("::")
    cloud = Cloud(Path(root))
    try:
        module, _ = load_app(path)
        _create_app(cloud)
        for cls, attribute, replacement in client_methods(cloud):
            setattr(cls, attribute, replacement)
        getattr(module, entrypoint)(**_arguments(argv[2:]))
    except Exception:
        traceback.print_exc()
        return 1
    return 0
