"""Warm stage launches on the local backend: a fork server with the heavy libraries imported.

A stage that runs the model spends 7–9 s importing torch, transformers and peft before it does
any work (`python -X importtime -m modal_jobs.stages.train`). Like Dagster's `forkserver` start
method, a Gradle daemon or a Bazel server, the first local launch starts a server process that
imports those libraries once; each launch after it is a `fork()` of that server, so a stage
starts in well under a second. The project's own modules are never preloaded: each stage
imports them fresh, so edits apply to the next launch and what they read from the environment
at import (`MOLE_MODAL_GPU`, …) is the launch's.

What Dagster runs is still a subprocess, `python -m modal_jobs.launch.warm <module>` (the
*client*: this module, which imports no third-party library; the server is `warm_server.py`).
It hands the server its stdin/stdout/stderr (SCM_RIGHTS), its environment, working directory
and arguments, and mirrors the stage: the stage's exit status (a death by signal as the same
signal), and SIGTERM/SIGINT/SIGHUP sent to the client are passed on. If the client dies
(kill -9, a lost run worker), the stage is killed; if the server side dies, the stage dies with
it (PR_SET_PDEATHSIG). Anything wrong before the stage starts — no server, a server that
cannot start, a socket path too long — and the client `exec`s the
plain `python -m <module>` instead, so a launch never depends on the server.

One server serves one interpreter, library versions, CPU affinity and import-time environment
(the variables under `KEYED_PREFIXES`: thread counts, Hugging Face and CUDA settings, `HOME`,
`PATH`, …); another combination gets its own server. A server exits after `MOLE_WARM_IDLE_S`
seconds (default 600) without a stage running, or within a second of its socket file being
removed. `MOLE_WARM_STAGES=0` turns warm launches off. Sockets and server logs are in
`MOLE_WARM_DIR` (default `/tmp/mole-warm-<uid>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modal_jobs.launch.warm_server import (
    FORWARDED_SIGNALS,
    IDLE_ENV,
    MESSAGE_MAX,
    PRELOAD,
    die_by,
    locked,
)

WARM_ENV = "MOLE_WARM_STAGES"
DIR_ENV = "MOLE_WARM_DIR"
VERSIONED = ("torch", "torchvision", "transformers", "peft", "numpy", "safetensors", "matplotlib")
# Environment variables libraries read when imported: a server is only shared by launches that
# agree on all of them (and it runs with only these, plus nothing of the first launch's own).
KEYED_PREFIXES = (
    "CUDA",
    "GOMP_",
    "HF_",
    "HUGGINGFACE",
    "KMP_",
    "LD_",
    "MKL_",
    "MPL",
    "NVIDIA_",
    "OMP_",
    "OPENBLAS_",
    "PYTHON",
    "PYTORCH_",
    "SAFETENSORS",
    "TOKENIZERS_",
    "TORCH",
    "TRANSFORMERS_",
    "XDG_",
)
KEYED_NAMES = ("HOME", "LANG", "LC_ALL", "PATH", "TMPDIR")
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
SERVER_START_S = 120.0  # a server importing on a loaded machine


def enabled(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether local stage launches go through the warm server (`MOLE_WARM_STAGES`, default on)."""
    return env.get(WARM_ENV, "1") != "0"


def command(module: str) -> list[str]:
    """The warm launch of `python -m <module>`."""
    return [sys.executable, "-m", "modal_jobs.launch.warm", module]


def keyed_env(env: dict[str, str]) -> dict[str, str]:
    """The part of `env` that libraries read at import: what a server runs with."""
    return {
        k: v for k, v in sorted(env.items()) if k.startswith(KEYED_PREFIXES) or k in KEYED_NAMES
    }


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def server_key(env: dict[str, str], cpus: set[int] | None = None) -> str:
    """Which server a launch with `env` on `cpus` (default: this process's CPUs) may use.

    The key is the interpreter, library versions, keyed env and CPUs. The CPUs are in it
    because OpenMP sizes torch's thread pool from the affinity a process has when torch is
    imported: a server started under `taskset -c 0` would hand a launch on every CPU one
    thread where `python -m` gives it one per core.
    """
    facts = {
        "python": [sys.executable, sys.version],
        "versions": {name: _version(name) for name in VERSIONED},
        "preload": PRELOAD,
        "env": keyed_env(env),
        "cpus": sorted(os.sched_getaffinity(0) if cpus is None else cpus),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def server_dir(env: dict[str, str]) -> Path:
    """Where sockets and server logs live (`MOLE_WARM_DIR`, default `/tmp/mole-warm-<uid>`)."""
    return Path(env.get(DIR_ENV) or f"/tmp/mole-warm-{os.getuid()}")


# --- client -------------------------------------------------------------------------------------


def _private_dir(path: Path) -> bool:
    """Create `path` (mode 0700) if needed; use it only if this user owns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path.stat().st_uid == os.getuid()


def _start_server(path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the server
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "modal_jobs.launch.warm_server", str(path)],
            env={**keyed_env(env), **{k: env[k] for k in (IDLE_ENV,) if k in env}},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives the run that started it, like a daemon
            cwd=Path(__file__).resolve().parents[2],
        )


def _connect(path: Path, env: dict[str, str]) -> socket.socket | None:
    """A connection to the server for `env`, or None.

    None if there is no server yet (this launch runs directly while one starts in the
    background) or the one starting does not come up in time.
    """
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if not locked(path.with_suffix(".lock")):  # no server is starting or running
            _start_server(path, env)
            return None
        time.sleep(0.05)
    return None


class _Signals:
    """SIGTERM/SIGINT/SIGHUP caught from before the request; passed on once the stage runs."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pending: list[int] = []
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self.caught)

    def caught(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)
        self.flush()

    def flush(self) -> None:
        while self.sock is not None and self.pending:
            with contextlib.suppress(OSError):  # the stage has just ended
                self.sock.send(f"signal {self.pending[0]}".encode())
            self.pending.pop(0)


def _request(sock: socket.socket, module: str, args: list[str], env: dict[str, str]) -> bool:
    """Send the launch; whether the server says the stage started."""
    umask = os.umask(0)
    os.umask(umask)
    request = {"module": module, "args": args, "env": env, "cwd": os.getcwd(), "umask": umask}
    request["cpus"] = sorted(os.sched_getaffinity(0))
    try:
        socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
        answer = sock.recv(MESSAGE_MAX).split()
    except OSError:
        return False
    return answer == [b"started"]


def _mirror(sock: socket.socket, signals: _Signals) -> int:
    """Forward signals to the stage until it ends; its exit code (a signal: re-raised here)."""
    signals.sock = sock
    signals.flush()
    answer = sock.recv(MESSAGE_MAX).split()
    if len(answer) != 2 or answer[0] != b"exit":
        print("error: the warm stage server went away during the stage", file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(int(answer[1]))
    if code < 0:
        die_by(-code)
        return 128 - code
    return code


def _warm(module: str, args: list[str], env: dict[str, str], signals: _Signals) -> int | None:
    """The stage's exit code from a warm launch; None if it could not be launched warm."""
    path = server_dir(env) / f"{server_key(env)}.sock"
    if not enabled(env) or len(str(path)) > SOCKET_PATH_MAX or not _private_dir(path.parent):
        return None
    for _attempt in range(2):  # once more if a server exited just as we connected
        sock = _connect(path, env)
        if sock is None:
            return None
        if _request(sock, module, args, env):
            return _mirror(sock, signals)
        sock.close()
    return None


def launch(module: str, args: list[str]) -> int:
    """Run `python -m <module> <args>` in a fork of the warm server, or directly without one."""
    signals = _Signals()
    with contextlib.suppress(OSError):  # an unusable MOLE_WARM_DIR, a broken connection, …
        code = _warm(module, args, dict(os.environ), signals)
        if code is not None:
            return code
    if signals.pending:  # what arrived before the stage could run ends the launch
        die_by(signals.pending[0])
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def main(argv: list[str]) -> int:
    """`warm <module> [args…]`: run `python -m <module> [args…]`, warm if it can."""
    return launch(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
