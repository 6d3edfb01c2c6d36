"""mole as a service: code server, daemon and webserver as three processes on 127.0.0.1.

`make service`, `make prod-check` and the service tests start them through `Service`, against
the instance `deploy/dagster.yaml` describes (PostgreSQL from `MOLE_DAGSTER_PG_URL`). The code
location runs in its own gRPC server (`dagster code-server start`); webserver and daemon load
it from there (`deploy/workspace.yaml`), so either can restart without the other noticing.
Each process writes its log to `<log_dir>/<name>.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modal_jobs.layout import mole_home
from mole_assets.instance import DEPLOY_DIR, PG_URL_ENV, service_home
from mole_assets.webserver import REPO, free_port, stop_group, wait_until_up

BIN = Path(sys.executable).parent
NAMES = ("code-server", "daemon", "webserver")


def service_env(base: Mapping[str, str], pg_url: str, state_dir: Path) -> dict[str, str]:
    """`base` plus what the three processes need: the instance, the database, a code port.

    `DAGSTER_HOME` becomes `service_home(state_dir)` (the service's settings are
    `deploy/dagster.yaml`); `MOLE_CODE_SERVER_PORT` is kept when given, else a free port.
    """
    return {
        "MOLE_CODE_SERVER_PORT": str(free_port()),
        **base,
        "MOLE_DAGSTER_PG_URL": pg_url,
        "DAGSTER_HOME": str(service_home(state_dir)),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Service:
    """The three processes; start, kill and restart each one by name."""

    env: dict[str, str]
    log_dir: Path
    web_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The webserver's address."""
        return f"http://127.0.0.1:{self.web_port}"

    def command(self, name: str) -> list[str]:
        """The command line of the process `name` (one of `NAMES`)."""
        workspace = str(DEPLOY_DIR / "workspace.yaml")
        if name == "code-server":
            port = self.env["MOLE_CODE_SERVER_PORT"]
            return [
                *(str(BIN / "dagster"), "code-server", "start", "-m", "mole_assets.definitions"),
                *("--location-name", "mole", "-h", "127.0.0.1", "-p", port),
            ]
        if name == "daemon":
            return [str(BIN / "dagster-daemon"), "run", "-w", workspace]
        return [
            *(str(BIN / "dagster-webserver"), "-w", workspace),
            *("-h", "127.0.0.1", "-p", str(self.web_port)),
        ]

    def start(self, name: str) -> None:
        """Start `name` in its own process group, appending to its log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                self.command(name),
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_all(self, timeout: float = 180.0) -> None:
        """Start every process (the others once the code server listens); wait for the UI.

        The pools' limits are set up first, while no run can race for them.
        """
        initialize_pools(self.env, self.log_dir, timeout)
        self.start("code-server")
        self.wait_for_code_server(timeout)
        self.start("daemon")
        self.start("webserver")
        wait_until_up(f"{self.url}/server_info", self.processes["webserver"], timeout)

    def wait_for_code_server(self, timeout: float) -> None:
        """Return once the code server accepts connections (it listens after loading code)."""
        port = int(self.env["MOLE_CODE_SERVER_PORT"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["code-server"].poll() is not None:
                raise RuntimeError(f"code server exited; see {self.log_dir / 'code-server.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.5)
        raise TimeoutError(f"code server not listening on {port} within {timeout:.0f}s")

    def kill(self, name: str) -> None:
        """`kill -9` the process `name` and everything in its group (a crash, not a stop)."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, name: str) -> None:
        """Stop `name` (SIGTERM to its group, SIGKILL after 30 s)."""
        stop_group(self.processes.pop(name))

    def stop_all(self) -> None:
        """Stop every running process, webserver first, code server last."""
        for name in reversed(NAMES):
            if name in self.processes:
                self.stop(name)

    def log(self, name: str) -> str:
        """What `name` wrote so far (for failure messages)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def initialize_pools(env: Mapping[str, str], log_dir: Path, timeout: float) -> None:
    """Create the `gpu` pool's limit in the service's database once, before any run starts.

    Dagster creates it when a run first asks for a slot of the pool. On PostgreSQL two runs
    doing that at the same moment on a new database fail one of them: the losing INSERT's
    IntegrityError is caught inside the transaction and the UPDATE that follows runs in the
    aborted transaction (`InFailedSqlTransaction`; dagster/_core/storage/event_log/
    sql_event_log.py, `initialize_concurrency_limit_to_default`). Seen in `make prod-check`
    on fresh databases: the manual run beside the sensor's retrain failed at its first step.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "initialize-pools.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-c", "import mole_assets.service as s; s.initialize_pools_here()"],
            env=dict(env),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(f"setting up the pools failed; see {log_dir / 'initialize-pools.log'}")


def initialize_pools_here() -> None:
    """In this process's instance (`DAGSTER_HOME`): the `gpu` pool's limit row, if it has none.

    It follows the instance's default pool limit (`concurrency.pools.default_limit`), as the row
    Dagster makes itself does; a row already there (a restart) is left as it is.
    """
    import dagster as dg

    from mole_assets.assets import GPU_POOL

    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        if GPU_POOL not in storage.get_concurrency_keys():
            storage.initialize_concurrency_limit_to_default(GPU_POOL)


@contextlib.contextmanager
def running(env: dict[str, str], log_dir: Path, web_port: int = 0) -> Iterator[Service]:
    """The three processes, started and answering; stopped afterwards, even on failure.

    `web_port` 0 picks a free port.
    """
    service = Service(env, log_dir, web_port or free_port())
    try:
        service.start_all()
        yield service
    finally:
        service.stop_all()


def serve_forever(pg_url: str, state_dir: Path, web_port: int) -> None:
    """Run the three processes until interrupted or one of them exits."""
    env = service_env(os.environ, pg_url, state_dir)
    with running(env, state_dir / "service-logs", web_port) as service:
        print(f"mole service: {service.url} (logs in {service.log_dir})", flush=True)
        while all(p.poll() is None for p in service.processes.values()):
            time.sleep(1)
        stopped = [n for n, p in service.processes.items() if p.poll() is not None]
        raise SystemExit(f"mole service: {', '.join(stopped)} exited; see {service.log_dir}")


def main() -> int:
    """`make service`: the database from `MOLE_DAGSTER_PG_URL`, the UI on `UI_PORT` (3000)."""
    pg_url = os.environ.get(PG_URL_ENV, "")
    if not pg_url:
        print(
            f"make service needs {PG_URL_ENV}, e.g. "
            "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE",
            file=sys.stderr,
        )
        return 2
    # Its own DAGSTER_HOME: the embedded instance keeps `MOLE_HOME/dagster`.
    serve_forever(pg_url, mole_home() / "service", int(os.environ.get("UI_PORT", "3000")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
