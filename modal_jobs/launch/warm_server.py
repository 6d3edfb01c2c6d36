"""The warm stage server (see `warm.py`): imports the heavy libraries once, forks per launch.

Started by the first warm launch as `python -m modal_jobs.launch.warm_server <socket>`, in a
session of its own with only the import-time environment (`warm.keyed_env`). Single-threaded:
for each connection it forks a supervisor, which forks the stage and relays signals and the
exit status. No Python thread runs when it forks; the native pool numpy's OpenBLAS starts at
import is made fork-safe by OpenBLAS's own atfork handler, as for every `fork` start method.
A stage gets the launch's environment, working directory, umask and CPU affinity; resource
limits and niceness are the server's.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

IDLE_ENV = "MOLE_WARM_IDLE_S"
DEFAULT_IDLE_S = 600.0
# What a model stage imports from outside the project (a server imports these once).
PRELOAD = (
    "numpy",
    "PIL.Image",
    "pydantic",
    "safetensors.torch",
    "torch",
    "torchvision.transforms.v2.functional",
    "transformers",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",
    "peft",
    "torch.utils.tensorboard",
    "matplotlib",
)
PROJECT_PACKAGES = ("modal_jobs", "mole_assets", "tests", "scripts", "benchmarks")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MESSAGE_MAX = 1 << 20
PR_SET_PDEATHSIG = 1


@dataclass
class Stage:
    """A launch, in the forked process that becomes the stage."""

    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int]
    umask: int
    cpus: list[int]

    def run(self) -> NoReturn:
        """Become `python -m <module> <args>` as the client would have started it."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(self.cwd)
        os.umask(self.umask)
        os.sched_setaffinity(0, self.cpus)
        os.environ.clear()
        os.environ.update(self.env)
        for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
            del sys.modules[name]
        sys.path[0] = self.cwd  # as `python -m` from the client's working directory
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        unbuffered = bool(self.env.get("PYTHONUNBUFFERED"))
        sys.stdout = _text_stream(1, write_through=unbuffered, errors="strict")
        sys.stderr = _text_stream(2, write_through=True, errors="backslashreplace")
        sys.argv = [self.module, *self.args]  # runpy puts the module's path first
        try:
            runpy.run_module(self.module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:  # as the interpreter does: the traceback, then die by SIGINT
            sys.excepthook(*sys.exc_info())
            code = -signal.SIGINT
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        _finish(code)


def _exit_code(code: object) -> int:
    """What the interpreter makes of `SystemExit(code)`."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _finish(code: int) -> NoReturn:
    """End the stage as the interpreter would, less its module teardown.

    Non-daemon threads are joined, `atexit` functions run and the streams are flushed, as at a
    normal exit; what is skipped is clearing every module of the preloaded libraries, which
    takes about 2 s with torch and transformers loaded and which no stage may rely on.
    """
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code < 0:
        die_by(-code)
    os._exit(code if code >= 0 else 128 - code)


def die_by(signum: int) -> None:
    """End this process by `signum`'s default action, as a process the signal killed ends."""
    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _text_stream(fd: int, write_through: bool, errors: str) -> io.TextIOWrapper:
    raw = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))
    return io.TextIOWrapper(
        raw, encoding="utf-8", errors=errors, line_buffering=True, write_through=write_through
    )


def _receive(conn: socket.socket) -> Stage | None:
    message, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_MAX, 3)
    if len(fds) != 3 or not message:
        return None
    request = json.loads(message)
    module, args, env, cwd = (request[k] for k in ("module", "args", "env", "cwd"))
    return Stage(module, args, env, cwd, fds, request["umask"], request["cpus"])


def _supervise(conn: socket.socket) -> Stage | None:
    """In a fork per connection: fork the stage, relay signals, report how it ended.

    Returns the `Stage` in the stage's process only; the supervisor itself ends here.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    stage = _receive(conn)
    if stage is None:
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        conn.close()
        return stage
    for fd in stage.fds:
        os.close(fd)
    conn.send(b"started")
    _relay(conn, pid)
    os._exit(0)


def _relay(conn: socket.socket, pid: int) -> None:
    """Pass the client's signals to stage `pid` until it ends, then tell the client how."""
    child = os.pidfd_open(pid)
    while child not in select.select([conn.fileno(), child], [], [])[0]:
        message = conn.recv(MESSAGE_MAX).split()
        if not message:  # the client is gone: so is its stage
            os.kill(pid, signal.SIGKILL)
            break
        if message[0] == b"signal":
            os.kill(pid, int(message[1]))
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.send(f"exit {status}".encode())


def _preload() -> None:
    import matplotlib

    matplotlib.use("Agg")  # what the stages' plots use; never a GUI backend in a server
    for name in PRELOAD:
        importlib.import_module(name)
    torch = sys.modules["torch"]
    if threading.active_count() != 1 or torch.cuda.is_initialized():
        raise RuntimeError("preloading started a thread or CUDA: forking it would not be safe")


def _listen(path: Path) -> socket.socket:
    """Bind a socket beside `path`, then move it into place (replacing a dead server's)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare = path.with_name(f".{path.name}.{os.getpid()}")
    spare.unlink(missing_ok=True)
    sock.bind(str(spare))
    sock.listen(64)
    os.replace(spare, path)
    sock.settimeout(1.0)
    return sock


def serve(path: Path) -> Stage | None:
    """The server's loop; returns a `Stage` only in a forked stage process."""
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None  # another server for this key is starting or running
    _preload()
    sock = _listen(path)
    inode, idle = os.stat(path).st_ino, float(os.environ.get(IDLE_ENV, DEFAULT_IDLE_S))
    running: set[int] = set()
    last_busy = time.monotonic()
    print(f"serving {path} (pid {os.getpid()})", flush=True)
    while _still_ours(path, inode) and (running or time.monotonic() - last_busy < idle):
        _reap(running)
        if running:
            last_busy = time.monotonic()
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            lock.close()
            return _supervise(conn)
        conn.close()
        running.add(pid)
    sock.close()  # before the (slow) interpreter exit: queued clients go elsewhere now
    if _still_ours(path, inode):
        path.unlink()
    return None


def _still_ours(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except FileNotFoundError:
        return False


def _reap(running: set[int]) -> None:
    for pid in list(running):
        if os.waitpid(pid, os.WNOHANG)[0]:
            running.discard(pid)


def stop_servers(folder: Path, timeout: float = 10.0) -> list[Path]:
    """Stop the servers of `folder` (remove their sockets, wait for them to exit).

    Stages they are running go on to their end. Returns the locks still held after `timeout`.
    """
    deadline = time.monotonic() + timeout
    held = list(folder.glob("*.lock"))
    while held and time.monotonic() < deadline:
        for sock in folder.glob("*.sock"):  # again each time: one still preloading binds later
            sock.unlink(missing_ok=True)
        held = [lock for lock in held if locked(lock)]
        time.sleep(0.1)
    return held


def locked(path: Path) -> bool:
    """Whether a server holds the lock `path` (it does from start to exit)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def main(argv: list[str]) -> int:
    """`warm_server <socket>`: serve until idle; in a forked stage, become the stage."""
    stage = serve(Path(argv[0]))
    if stage is not None:
        stage.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
