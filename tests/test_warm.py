"""Warm stage launches (`modal_jobs/launch/warm.py`): a real fork server on this machine, driven
through its client as Dagster runs it, with a probe module standing in for a stage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modal_jobs.launch import warm, warm_server

from .conftest import REPO

PROBE = "tests.warm_probe"


def probe_env(servers: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARM_PROBE")}
    return {**env, warm.DIR_ENV: str(servers), "PYTHONPATH": str(REPO), **extra}


def run(
    env: dict[str, str],
    *args: str,
    warm_launch: bool = True,
    cwd: Path = REPO,
    stdin: str = "",
    cpus: set[int] | None = None,
) -> tuple[int, dict[str, Any], str]:
    """Launch the probe (warm, or plain `python -m`; on `cpus`, default all of this process's);
    its exit code, report and stderr."""
    head = warm.command(PROBE) if warm_launch else [sys.executable, "-m", PROBE]

    def launch_settings() -> None:
        os.umask(0o027)  # the launch's, which a warm stage must get too
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    done = subprocess.run(
        [*head, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=launch_settings,
    )
    report = json.loads(done.stdout.splitlines()[0]) if done.stdout else {}
    return done.returncode, report, done.stderr


def wait_for_server(env: dict[str, str], cpus: set[int] | None = None) -> Path:
    """The socket of the server for `env` (on `cpus`), once it accepts connections."""
    path = warm.server_dir(env) / f"{warm.server_key(env, cpus)}.sock"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            try:
                sock.connect(str(path))
                return path
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.2)
    raise TimeoutError(f"no server at {path}")


def server_pid(socket_path: Path) -> int:
    said = socket_path.with_suffix(".log").read_text().split(f"serving {socket_path} (pid ")
    return int(said[-1].split(")")[0])


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def servers() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="warm-test-"))
    yield folder
    assert warm_server.stop_servers(folder) == []
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def warm_env(servers: Path) -> dict[str, str]:
    """The probe's environment, with its server started and ready."""
    env = probe_env(servers)
    code, first, _ = run(env)
    assert code == 0 and first["torch_preloaded"] is False  # no server yet: run directly
    wait_for_server(env)
    return env


def test_a_warm_launch_is_the_stage_as_python_would_run_it(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**warm_env, "WARM_PROBE_ONLY_HERE": "yes"}
    args = ("exit", "0")
    warm_code, warm_report, warm_err = run(env, *args, cwd=tmp_path, stdin="line one\nline two")
    plain_code, plain_report, plain_err = run(
        env, *args, warm_launch=False, cwd=tmp_path, stdin="line one\nline two"
    )
    assert warm_report.pop("torch_preloaded") is True  # forked from the server
    assert plain_report.pop("torch_preloaded") is False
    assert warm_report.pop("pid") != plain_report.pop("pid")
    assert warm_report == plain_report
    assert warm_report["env"] == {"WARM_PROBE_ONLY_HERE": "yes"}  # the launch's, not the server's
    assert warm_report["cwd"] == str(tmp_path) and warm_report["stdin"] == "line one"
    assert warm_report["project_preloaded"] is False  # the project's modules import fresh
    assert warm_report["umask"] == 0o027
    assert (warm_code, warm_err) == (plain_code, plain_err) == (0, "to stderr\n")


@pytest.mark.parametrize(
    ("args", "code"),
    [(("exit", "4"), 4), (("signal", "9"), -9), (("signal", "15"), -15), (("signal", "2"), -2)],
)
def test_exit_status_and_death_by_signal_are_mirrored(
    warm_env: dict[str, str], args: tuple[str, str], code: int
) -> None:
    got, report, _ = run(warm_env, *args)
    assert report["torch_preloaded"] is True
    assert got == code


def test_an_exception_exits_1_with_its_traceback(warm_env: dict[str, str]) -> None:
    got, report, stderr = run(warm_env, "raise", "0")
    assert report["torch_preloaded"] is True
    assert got == 1
    assert "Traceback" in stderr and "RuntimeError: the probe was asked to fail" in stderr


def test_sigterm_to_the_client_reaches_the_stage(warm_env: dict[str, str]) -> None:
    client = subprocess.Popen(
        [*warm.command(PROBE), "trap"],
        env=warm_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    assert json.loads(client.stdout.readline())["torch_preloaded"] is True
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=60) == 3
    assert client.stdout.read() == "got SIGTERM\n"


def test_killing_the_client_kills_its_stage(warm_env: dict[str, str]) -> None:
    client = subprocess.Popen(
        [*warm.command(PROBE), "sleep", "120"],
        env=warm_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    stage = json.loads(client.stdout.readline())["pid"]
    assert stage != client.pid and alive(stage)
    client.kill()
    client.wait()
    deadline = time.monotonic() + 30
    while alive(stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(stage)


def test_another_import_time_environment_gets_its_own_server(
    warm_env: dict[str, str], servers: Path
) -> None:
    other = {**warm_env, "OMP_NUM_THREADS": "1"}
    assert warm.server_key(other) != warm.server_key(warm_env)
    assert warm.server_key({**warm_env, "MOLE_HOME": "/elsewhere"}) == warm.server_key(warm_env)
    code, report, _ = run(other)
    assert code == 0 and report["torch_preloaded"] is False  # it did not use the first server
    wait_for_server(other)
    assert len(list(servers.glob("*.sock"))) == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_server_started_on_one_cpu_is_not_shared_with_a_launch_on_all() -> None:
    """torch sizes its thread pool from the CPUs it was imported on: a stage forked from a
    server started under `taskset -c 0` would otherwise train with one thread on every CPU."""
    folder = Path(tempfile.mkdtemp(prefix="warm-cpus-"))
    env = probe_env(folder)
    every, one = os.sched_getaffinity(0), {min(os.sched_getaffinity(0))}

    def threads(cpus: set[int], warm_launch: bool = True) -> tuple[bool, int]:
        code, report, _ = run(env, "threads", warm_launch=warm_launch, cpus=cpus)
        assert code == 0 and report["cpus"] == sorted(cpus)
        return report["torch_preloaded"], report["threads"]

    plain = {"every": threads(every, False)[1], "one": threads(one, False)[1]}
    if plain["every"] == plain["one"]:
        pytest.skip(f"torch uses {plain['one']} thread(s) on one CPU and on all of them here")
    threads(one)  # runs directly and starts the one-CPU server
    wait_for_server(env, one)
    assert threads(one) == (True, plain["one"])
    assert threads(every) == (False, plain["every"])  # not the one-CPU server: its own
    wait_for_server(env, every)
    assert threads(every) == (True, plain["every"])
    assert len(list(folder.glob("*.sock"))) == 2
    assert warm_server.stop_servers(folder) == []
    shutil.rmtree(folder)


def test_off_switch_runs_directly_and_starts_nothing() -> None:
    folder = Path(tempfile.mkdtemp(prefix="warm-off-"))
    env = probe_env(folder, **{warm.WARM_ENV: "0"})
    code, report, _ = run(env)
    assert code == 0 and report["torch_preloaded"] is False
    assert list(folder.iterdir()) == []
    folder.rmdir()


def test_an_unusable_server_folder_runs_the_stage_directly(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code, report, stderr = run(probe_env(not_a_folder / "servers"))
    assert (code, report["torch_preloaded"], stderr) == (0, False, "to stderr\n")


def test_a_dead_servers_socket_is_replaced() -> None:
    folder = Path(tempfile.mkdtemp(prefix="warm-dead-"))
    env = probe_env(folder)
    run(env)
    path = wait_for_server(env)
    pid = server_pid(path)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists()  # the dead server's socket is left behind
    code, report, _ = run(env)
    assert code == 0 and report["torch_preloaded"] is False  # refused: ran directly, restarted
    assert server_pid(wait_for_server(env)) != pid
    assert run(env)[1]["torch_preloaded"] is True
    assert warm_server.stop_servers(folder) == []
    assert list(folder.glob("*.sock")) == []
    shutil.rmtree(folder)
