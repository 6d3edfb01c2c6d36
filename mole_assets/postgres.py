"""A throwaway PostgreSQL server for the service tests and `make prod-check`.

Debian's `postgresql` package provides the binaries (`apt-get install postgresql`; `.ci/run`
installs it). The server lives in a fresh temp folder, listens on 127.0.0.1 on a free port
(no Unix socket outside that folder) and is removed afterwards, even on failure. PostgreSQL
refuses to run as root, so under root it runs as the unprivileged `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mole_assets.webserver import free_port

DATABASE = "mole"
UNPRIVILEGED_USER = "postgres"


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def bin_dir() -> Path:
    """Where `initdb` and `pg_ctl` are: `PATH`, else Debian's newest `/usr/lib/postgresql/*`."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links single binaries into PATH
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True)
    if not versions:
        raise PostgresMissing(
            "PostgreSQL server binaries not found (initdb); fix: apt-get install -y postgresql"
        )
    return Path(versions[0]).parent


def _major(initdb: str) -> int:
    version = Path(initdb).parents[1].name
    return int(version) if version.isdigit() else 0


@dataclass
class Postgres:
    """One server: data folder, port, and the user it runs as."""

    root: Path
    port: int
    user: str | None  # None: the current user

    @property
    def url(self) -> str:
        """The URL of the `mole` database (trust auth on 127.0.0.1).

        `+psycopg2`: SQLAlchemy 2.1 would pick psycopg 3, and dagster-postgres installs psycopg2.
        """
        return f"postgresql+psycopg2://mole@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def data(self) -> Path:
        """The cluster's data folder."""
        return self.root / "data"

    def run(self, *args: str) -> None:
        """Run a PostgreSQL binary as the server's user; fail with its output."""
        options: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            options = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(bin_dir() / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
            **options,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        """Start the server (waits until it accepts connections)."""
        settings = f"-p {self.port} -h 127.0.0.1 -k {self.data} -F"
        self.run("pg_ctl", "-D", str(self.data), "-o", settings, "-l", "server.log", "-w", "start")

    def stop(self) -> None:
        """Stop the server now (no checkpoint wait; it is thrown away or restarted)."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def throwaway() -> Iterator[Postgres]:
    """A fresh server with a `mole` database; stopped and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mole-pg-"))
    user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = Postgres(root, free_port(), user)
    started = False
    try:
        server.run("initdb", "-D", str(server.data), "-U", "mole", "--auth=trust", "--no-sync")
        server.start()
        started = True
        server.run("createdb", "-h", "127.0.0.1", "-p", str(server.port), "-U", "mole", DATABASE)
        yield server
    finally:
        if started:
            with contextlib.suppress(RuntimeError):
                server.stop()
        shutil.rmtree(root, ignore_errors=True)
