"""The emulated cloud: function calls as containers (processes in private mount namespaces).

What a call does here, and the modal source it follows:
- one container per attempt: its own process, started by `unshare --mount`, with only the
  volumes the function declares bound at their mount paths, `/root` holding the function's own
  file and the image's `add_local_python_source` packages (modal/_utils/function_utils.py
  `FunctionInfo.get_entrypoint_mount`, modal/_image.py `add_local_python_source`: `.py` files
  only), and the environment of a container: the image's `ENV` lines, the function's secrets,
  Modal's `MODAL_*` variables, `PYTHONPATH=/root` — nothing of the caller's environment;
- only the packages the image pip-installs (with their dependencies) and Modal's client
  (modal/builder/2025.06.txt): this machine's interpreter runs with `-S` and a site folder of
  links to just those (`image.site_folder`), so an import the image lacks fails as on Modal;
- `retries` (modal/retries.py `Retries`): a failed input is run again in a new container, up to
  `max_retries` times (back-off delays are not waited here);
- `timeout` (modal/app.py `function`, default 300 s): the container is killed and the call
  raises `modal.exception.FunctionTimeoutError` (modal/_utils/function_utils.py `_process_result`);
- a user exception is pickled in the container and re-raised in the caller as the same type;
  one that cannot be pickled becomes `modal.exception.RemoteError` (same function);
- `max_containers`: at most that many containers of the function run at once, across every
  caller process (the limit is the server's, so it holds across machines);
- `.map()` runs its inputs in several containers at once and yields results in input order.
GPUs are not emulated: GPU functions run on this machine's CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pickle
import shlex
import shutil
import site
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .image import ImageDefinition, site_folder
from .volumes import VolumeStore

HERE = Path(__file__).resolve().parent
MODAL_DEFAULT_TIMEOUT_S = 300  # modal/app.py `App.function(timeout=...)`
MAP_PARALLEL = 4  # containers a `.map()` keeps busy at once (Modal autoscales; we have 2 cores)


@dataclass
class Declared:
    """What `@app.function(...)` declared for one function (what Modal's server receives)."""

    name: str
    module: str
    file: Path
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def max_retries(self) -> int:
        """`retries`: an int or a `modal.Retries` (modal/retries.py)."""
        retries = self.options.get("retries") or 0
        return int(retries if isinstance(retries, int) else retries.max_retries)

    def volumes(self) -> dict[str, str]:
        """Mount path → volume name."""
        return {str(m): v.name for m, v in (self.options.get("volumes") or {}).items()}


def unavailable() -> str | None:
    """Why containers cannot be emulated on this machine (no private mount namespaces), or None."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    try:
        Path("/vol").mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot create the /vol mount point: {exc}"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/vol"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"no private mount namespace: {probe.stderr.strip()}"


class Cloud:
    """The emulated workspace: volumes, secrets and a log of container starts, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = VolumeStore(root / "volumes")
        for folder in ("volumes", "containers", "slots", "bin"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    # --- the workspace ---------------------------------------------------------------------
    def volume(self, name: str) -> Path:
        """The committed state of volume `name`."""
        return self.store.committed(name)

    def secrets(self) -> dict[str, dict[str, str]]:
        """Secrets of the workspace: name → environment variables."""
        path = self.root / "secrets.json"
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def set_secret(self, name: str, values: dict[str, str]) -> None:
        """Create (or replace) a secret, as `modal secret create NAME K=V` would."""
        (self.root / "secrets.json").write_text(json.dumps({**self.secrets(), name: values}))

    def hold_commits(self, function: str, containers: int, seconds: float) -> None:
        """Fault injection: a container of `function` committing waits (at most `seconds`) until
        `containers` of them are committing, so their reload-to-commit windows overlap for sure
        (as they may on Modal, where a commit is an upload that takes its time)."""
        shutil.rmtree(self.root / "holding" / function, ignore_errors=True)
        (self.root / "holds.json").write_text(json.dumps({function: [containers, seconds]}))

    def _hold(self, function: str) -> list[Any] | None:
        holds = self.root / "holds.json"
        return json.loads(holds.read_text()).get(function) if holds.is_file() else None

    def starts(self, function: str | None = None) -> list[dict[str, Any]]:
        """Every container started so far (optionally of one function), oldest first."""
        log = self.root / "starts.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        return [r for r in rows if function is None or r["function"] == function]

    def shim(self) -> Path:
        """The folder holding a `modal` executable that runs this emulator: put it first on PATH."""
        script = self.root / "bin" / "modal"
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(HERE.parents[1])!r})\n"
            "from tests.modal_emulator.cli import main\n"
            "del sys.path[0]\n"
            f"sys.exit(main({str(self.root)!r}, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
        return script.parent

    # --- calls -------------------------------------------------------------------------------
    def call(self, declared: Declared, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """`Function.remote`: run the input, in a new container per attempt, until it succeeds."""
        import modal.exception

        outcome: tuple[Any, ...] = ()
        for attempt in range(1 + declared.max_retries):
            with self._slot(declared):
                outcome = self._container(declared, args, kwargs, attempt)
            if outcome[0] == "ok":
                return outcome[1]
        if outcome[0] == "timeout":
            raise modal.exception.FunctionTimeoutError(outcome[1])
        if outcome[1] is not None:
            raise outcome[1]
        raise modal.exception.RemoteError(outcome[2])

    def map(self, declared: Declared, iterables: tuple[Iterable[Any], ...]) -> Iterator[Any]:
        """`Function.map`: inputs in parallel containers, results in input order."""
        inputs = list(zip(*iterables, strict=False))
        limit = declared.options.get("max_containers") or MAP_PARALLEL
        with ThreadPoolExecutor(max(1, min(len(inputs), limit, MAP_PARALLEL))) as pool:
            futures = [pool.submit(self.call, declared, tuple(a), {}) for a in inputs]
            results = [future.result() for future in futures]
        yield from results

    @contextlib.contextmanager
    def _slot(self, declared: Declared) -> Iterator[None]:
        limit = declared.options.get("max_containers")
        if not limit:
            yield
            return
        slots = [self.root / "slots" / f"{declared.name}.{i}" for i in range(limit)]
        with contextlib.ExitStack() as stack:
            while True:
                handles = [stack.enter_context(open(slot, "w")) for slot in slots]
                if any(_try_lock(handle) for handle in handles):
                    break
                stack.close()
                time.sleep(0.05)
            yield

    def _prepare(
        self, declared: Declared, call: dict[str, Any], attempt: int
    ) -> tuple[str, Path, list[str]]:
        """A container's folder (volume views, `/root`, the call) and the command starting it."""
        cid = f"ta-{uuid.uuid4().hex[:12]}"
        home = self.root / "containers" / cid
        views = {name: home / "views" / name for name in declared.volumes().values()}
        for name, view in views.items():
            self.store.snapshot(name, view)
        _fill_root(home / "root", declared)
        call = {
            **call,
            "module": declared.module,
            "function": declared.name,
            "volumes": declared.volumes(),
            "views": {name: str(view) for name, view in views.items()},
            "store": str(self.store.root),
            "result": str(home / "result.pkl"),
            "port_file": str(home / "port"),
            "hold": self._hold(declared.name),
            "runtime_site": site.getsitepackages()[0],
            "holding": str(self.root / "holding" / declared.name),
        }
        (home / "call.pkl").write_bytes(pickle.dumps(call))
        with open(self.root / "starts.jsonl", "a") as log:
            log.write(json.dumps({"function": declared.name, "attempt": attempt, "id": cid}) + "\n")
        script = self._script(declared, home, cid)
        return cid, home, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _container(
        self, declared: Declared, args: tuple[Any, ...], kwargs: dict[str, Any], attempt: int
    ) -> tuple[Any, ...]:
        cid, home, command = self._prepare(declared, {"args": args, "kwargs": kwargs}, attempt)
        timeout = declared.options.get("timeout") or MODAL_DEFAULT_TIMEOUT_S
        process = subprocess.Popen(command, start_new_session=True)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            return ("timeout", f"{declared.name} timed out after {timeout} s (container {cid})")
        result = home / "result.pkl"
        try:
            if not result.is_file():
                return ("error", None, f"container {cid} of {declared.name} exited with {code}")
            try:
                outcome: tuple[Any, ...] = pickle.loads(result.read_bytes())
            except Exception as exc:  # modal/_utils/function_utils.py: deserialization failed
                import modal.exception

                return (
                    "error",
                    modal.exception.ExecutionError(f"could not deserialize: {exc}"),
                    "",
                )
            return outcome
        finally:
            shutil.rmtree(home, ignore_errors=True)

    @contextlib.contextmanager
    def serve(self, declared: Declared, startup_s: float = 120.0) -> Iterator[str]:
        """A web endpoint's container, serving on a free local port: yields its base URL.

        The container imports the app and calls the endpoint's factory (`@modal.wsgi_app` /
        `@modal.asgi_app`, modal/_partial_function.py), as Modal's web containers do.
        """
        import modal.exception

        _, home, command = self._prepare(declared, {"serve": True, "args": (), "kwargs": {}}, 0)
        process = subprocess.Popen(command, start_new_session=True)
        port = home / "port"
        deadline = time.monotonic() + startup_s
        while not port.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            if not port.is_file():
                raise modal.exception.RemoteError(f"{declared.name}: web container did not start")
            yield f"http://127.0.0.1:{port.read_text().strip()}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 15)
            process.wait()
            shutil.rmtree(home, ignore_errors=True)

    def _environment(self, declared: Declared, cid: str) -> dict[str, str]:
        image = ImageDefinition.of(declared.options["image"])
        packages = site_folder(image, self.root / "images")
        env = image.env()
        workspace = self.secrets()
        for secret in declared.options.get("secrets") or ():
            env.update(workspace[secret.name])
        return {
            **env,
            "HOME": "/root",
            "PYTHONPATH": f"/root:{packages}",
            # Modal's own variables in every container (modal.com/docs/guide/environment_variables).
            "MODAL_IS_REMOTE": "1",
            "MODAL_TASK_ID": cid,
            "MODAL_ENVIRONMENT": "main",
            "MODAL_REGION": "emulated",
            "MODAL_CLOUD_PROVIDER": "emulated",
            "MODAL_IMAGE_ID": f"im-emulated-{abs(hash(image.commands)) % 10**12}",
        }

    def _script(self, declared: Declared, home: Path, cid: str) -> str:
        """The shell run in the new mount namespace: mounts, then the container's process."""
        lines = ["set -e", "mount -t tmpfs emulated-volumes /vol"]
        for mount, name in declared.volumes().items():
            lines += [
                f"mkdir -p {shlex.quote(mount)}",
                f"mount --bind {home}/views/{name} {shlex.quote(mount)}",
            ]
        # /root becomes the container's; what the emulator itself runs from stays reachable.
        keep = [p for p in _runtime_paths() if Path(p).is_relative_to("/root")]
        for index, path in enumerate(keep):
            lines += [
                f"mkdir -p {home}/keep/{index}",
                f"mount --bind {shlex.quote(path)} {home}/keep/{index}",
            ]
        lines.append(f"mount --bind {home}/root /root")
        for index, path in enumerate(keep):
            lines += [
                f"mkdir -p {shlex.quote(path)}",
                f"mount --bind {home}/keep/{index} {shlex.quote(path)}",
            ]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self._environment(declared, cid).items())
        # `-S`: not this machine's site-packages but the image's (`site_folder`), on PYTHONPATH.
        boot = f"{shlex.quote(sys.executable)} -P -S {HERE / 'container.py'} {home / 'call.pkl'}"
        lines += ["cd /root", f"exec env -i {env} {boot}"]
        return "\n".join(lines)


def _try_lock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _runtime_paths() -> list[str]:
    return sorted({sys.base_prefix, sys.prefix, str(HERE)})


def _fill_root(root: Path, declared: Declared) -> None:
    """`/root` of a container: the function's file and the image's added Python packages."""
    root.mkdir(parents=True)
    shutil.copyfile(declared.file, root / declared.file.name)
    for module in sorted(ImageDefinition.of(declared.options["image"]).python_sources):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"add_local_python_source: no local module {module!r}")
        if not spec.submodule_search_locations:
            shutil.copyfile(spec.origin, root / Path(spec.origin).name)
            continue
        package = Path(next(iter(spec.submodule_search_locations)))
        for source in package.rglob("*.py"):
            rel = source.relative_to(package)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            (root / module / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / module / rel)
