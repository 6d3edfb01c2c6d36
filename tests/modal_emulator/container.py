"""Inside one emulated container: import the app module as Modal does, run one input, commit.

Started by `tests/modal_emulator/cloud.py` as `python -P container.py CALL` in a private mount
namespace whose `/vol/<name>` are this container's views of the volumes it declares and whose
`/root` holds only the function's own file and the image's `add_local_python_source` packages.
Nothing here may import the project: if the image does not add it, it is not there.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load_volumes_module() -> Any:
    spec = importlib.util.spec_from_file_location("modal_emulator_volumes", HERE / "volumes.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Mounted:
    """This container's views of its volumes, and the state each view was last synced at."""

    def __init__(self, call: dict[str, Any]) -> None:
        volumes = _load_volumes_module()
        self.store = volumes.VolumeStore(Path(call["store"]))
        self.views: dict[str, Path] = {name: Path(p) for name, p in call["views"].items()}
        self.mounts: dict[str, str] = {name: mount for mount, name in call["volumes"].items()}
        self.base = {name: volumes.scan(view) for name, view in self.views.items()}
        self.hold = call.get("hold")
        self.holding = Path(call["holding"]) / str(os.getpid())

    def _view(self, name: str) -> Path:
        if name not in self.views:
            # The server refuses a commit/reload of a volume this container does not mount;
            # `_Volume.commit` / `_Volume.reload` turn that into a RuntimeError.
            raise RuntimeError(f"Volume {name!r} is not mounted in this container")
        return self.views[name]

    def _wait_for_others(self) -> None:
        if not self.hold:
            return
        containers, seconds = self.hold
        self.holding.parent.mkdir(parents=True, exist_ok=True)
        self.holding.touch()
        deadline = time.monotonic() + seconds
        while len(list(self.holding.parent.iterdir())) < containers:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.hold = None  # one hold per container

    def commit(self, name: str) -> None:
        """`Volume.commit()` (modal/volume.py): persist, then reload (`skip_reload` false)."""
        self._wait_for_others()
        self.base[name] = self.store.commit(name, self._view(name), self.base[name])
        self.reload(name)

    def reload(self, name: str) -> None:
        """`Volume.reload()`: fails while files of the volume are open, as Modal's does."""
        view = self._view(name)
        for fd in Path("/proc/self/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith((f"{self.mounts[name]}/", f"{view}/")):
                raise RuntimeError(
                    f"there are open files preventing the operation: {target} is open"
                )
        self.base[name] = self.store.reload(name, view, self.base[name])


def _patch_modal(mounted: Mounted) -> None:
    import modal
    from modal._runtime.task_lifecycle_manager import _TaskLifecycleManager

    # modal/_runtime/execution_context.py `is_local()`: False only in a process running a
    # Modal Function, which Modal marks by creating the task lifecycle manager.
    _TaskLifecycleManager._singleton = object()  # type: ignore[assignment]
    modal.Volume.commit = lambda self: mounted.commit(self.name)  # type: ignore[method-assign]
    modal.Volume.reload = lambda self: mounted.reload(self.name)  # type: ignore[method-assign]


def _run(call: dict[str, Any]) -> Any:
    # modal/_utils/function_utils.py FunctionInfo: a function from a file run as a script is
    # imported in the container by the file's module name, from /root (on the PYTHONPATH).
    module = importlib.import_module(call["module"])
    function = getattr(module, call["function"])
    raw = function._get_source_info().raw_f  # what `Function.local` runs
    return raw(*call["args"], **call["kwargs"])


def _web_app(call: dict[str, Any]) -> tuple[str, Any]:
    """The endpoint's app and its kind ("asgi" or "wsgi"), made as a web container makes it.

    A function decorated `@modal.asgi_app()` / `@modal.wsgi_app()` is called for the app. A
    class (`@app.cls`) is instantiated, its `@modal.enter()` methods run (pre-, then
    post-snapshot; modal/_runtime/user_code_imports.py `lifecycle_context`), then its web method
    is called (`ImportedClass.get_finalized_functions`).
    """
    from modal._partial_function import (
        _find_callables_for_obj,
        _find_partial_methods_for_user_cls,
    )
    from modal._partial_function import _PartialFunctionFlags as Flags
    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    module = importlib.import_module(call["module"])
    obj = getattr(module, call["function"])
    if not hasattr(obj, "_get_user_cls"):
        config = synchronizer._translate_in(obj)._webhook_config  # set on the local `_Function`
        return _kind(config.type, api_pb2), _run(call)
    user = obj._get_user_cls()()
    for flag in (Flags.ENTER_PRE_SNAPSHOT, Flags.ENTER_POST_SNAPSHOT):
        for enter in _find_callables_for_obj(user, flag).values():
            enter()
    ((name, partial),) = _find_partial_methods_for_user_cls(type(user), Flags.WEB_INTERFACE).items()
    return _kind(partial.params.webhook_config.type, api_pb2), getattr(user, name)()


def _kind(webhook_type: int, api_pb2: Any) -> str:
    kinds = {api_pb2.WEBHOOK_TYPE_ASGI_APP: "asgi", api_pb2.WEBHOOK_TYPE_WSGI_APP: "wsgi"}
    if webhook_type not in kinds:
        raise NotImplementedError(f"emulated Modal serves ASGI and WSGI apps, not {webhook_type}")
    return kinds[webhook_type]


def _serve(call: dict[str, Any]) -> None:
    """A web endpoint's container: its app on a free port of 127.0.0.1.

    Modal's runtime serves the app itself (modal/_runtime/asgi.py, with the ASGI lifespan); here
    uvicorn (ASGI) or wsgiref (WSGI) stands in for it. uvicorn is the emulator's runtime, not
    the image's: it is loaded from the test environment, which leaves `sys.path` again before
    the app is imported.
    """
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    sys.path.append(call["runtime_site"])
    import uvicorn
    import uvicorn.lifespan.on  # noqa: F401 - loaded now, as said
    import uvicorn.loops.asyncio  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401

    sys.path.remove(call["runtime_site"])

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    kind, app = _web_app(call)
    if kind == "wsgi":
        server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
        Path(call["port_file"]).write_text(str(server.server_port))
        server.serve_forever()
        return
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http="h11", loop="asyncio", ws="none", lifespan="on", log_level="warning"
    )
    server_ = uvicorn.Server(config)
    # The port is announced once the lifespan startup has run (Modal routes requests to a
    # container only when it has started).
    original = server_.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        Path(call["port_file"]).write_text(str(sock.getsockname()[1]))

    server_.startup = startup  # type: ignore[method-assign]
    server_.run(sockets=[sock])


def main(call_file: str) -> None:
    """Run the call described in `call_file`; write `("ok", value)` or `("error", exc, tb)`."""
    call: dict[str, Any] = pickle.loads(Path(call_file).read_bytes())
    mounted = Mounted(call)
    _patch_modal(mounted)
    if call.get("serve"):
        _serve(call)
        return
    try:
        outcome: tuple[Any, ...] = ("ok", _run(call))
    except BaseException as exc:  # every failure of user code becomes the input's result
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        try:
            pickle.dumps(exc)
            outcome = ("error", exc, text)
        except Exception:
            outcome = ("error", None, text)
    finally:
        # modal/_runtime/user_code_imports.py: volumes are committed when the container exits,
        # outside the user's lifecycle, failed or not.
        for name in mounted.views:
            mounted.base[name] = mounted.store.commit(name, mounted.views[name], mounted.base[name])
    Path(call["result"]).write_bytes(pickle.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
