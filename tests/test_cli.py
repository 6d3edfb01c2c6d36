"""Tests for the `mole` command line (in-process, no training), plus one check that the
installed console script exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modal_jobs.demo_data import EXPERTS
from modal_jobs.layout import Volumes
from mole_assets.cli import main

from .conftest import MakeConfig

STAGE_MODULES = [
    ("routing_dataset", "dataset"),
    ("tokenized_shards", "shards"),
    ("expert_adapters", "experts"),
    ("router_checkpoint", "train"),
    ("eval_report", "evaluate"),
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MOLE_HOME, so nothing another test wrote (or deployed) is visible."""
    path = tmp_path / "mole_home"
    monkeypatch.setenv("MOLE_HOME", str(path))
    monkeypatch.delenv("MOLE_BACKEND", raising=False)
    return path


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("mole")
    assert script.is_file(), f"console script missing: {script}"
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for command in (
        "demo-data",
        "runs",
        "materialize",
        "report",
        "deploy",
        "route",
        "infer",
        "serve",
    ):
        assert command in done.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: mole" in capsys.readouterr().err


# --- demo-data -------------------------------------------------------------------------------


def test_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo-data", "--out", str(out), "--per-expert", "2", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPERTS)
    for expert in EXPERTS:
        lines = (out / expert / "datasets" / "demo.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [
            f"{expert}-1-00000",
            f"{expert}-1-00001",
        ]
        assert f"{expert}: 2 samples" in printed
    assert printed[-1] == f"wrote 12 samples under {out.resolve()}"


# --- runs ------------------------------------------------------------------------------------


def test_runs_add_and_list(dagster_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "list"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["runs", "add", "exp-1"]) == 0
    assert "added run exp-1" in capsys.readouterr().out
    assert main(["runs", "add", "exp_2.b"]) == 0
    capsys.readouterr()
    assert main(["runs", "list"]) == 0
    assert capsys.readouterr().out.split() == ["exp-1", "exp_2.b"]


@pytest.mark.parametrize("name", ["bad name!", "_leading", "a/b", "x" * 81])
def test_runs_add_rejects_bad_names(
    dagster_home: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["runs", "add", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid run name {name!r}")
    assert "use letters, digits, '_', '.' or '-'" in err
    assert main(["runs", "list"]) == 0
    assert capsys.readouterr().out == ""


# --- report ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "filename"), [([], "report.md"), (["--json"], "report.json")])
def test_report_missing(
    home: Path, capsys: pytest.CaptureFixture[str], flags: list[str], filename: str
) -> None:
    assert main(["report", "r1", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    expected = Volumes.local(home).run("r1").report / filename
    assert captured.err.startswith(f"error: {expected}: no eval report for run 'r1'")
    assert "fix: `mole materialize r1`" in captured.err


def test_report_prints_existing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = Volumes.local(home).run("r1").report
    report.mkdir(parents=True)
    (report / "report.md").write_text("# eval\naccuracy 0.9\n\n")
    assert main(["report", "r1"]) == 0
    assert capsys.readouterr().out == "# eval\naccuracy 0.9\n"


def test_report_rejects_bad_run_name(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "../etc"]) == 2
    assert "error: invalid run name '../etc'" in capsys.readouterr().err


# --- materialize --dry -----------------------------------------------------------------------


@pytest.fixture
def dry_env(
    home: Path, dagster_home: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(make_config()))
    return home


def test_materialize_dry_prints_plan_and_runs_nothing(
    dry_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["materialize", "dry1", "--dry"]) == 0
    every = capsys.readouterr().out.splitlines()
    assert every[-1].startswith("deployed_router: ") and '"selected": false' in every[-1]
    lines = every[:-1]  # the default selection stops at eval_report
    assert [line.split(":", 1)[0] for line in lines] == [asset for asset, _ in STAGE_MODULES]
    run_root = Volumes.local(dry_env).run("dry1").root
    for line, (asset, module) in zip(lines, STAGE_MODULES, strict=True):
        plan = json.loads(line.split(": ", 1)[1])
        warm = f"{sys.executable} -m modal_jobs.launch.warm modal_jobs.stages.{module}"
        assert plan["command"] == warm, asset
        assert plan["run_root"] == str(run_root)
        assert plan["backend"] == "local" and plan["selected"]
    assert not run_root.exists()
    assert not Volumes.local(dry_env).data.exists()
    # Nothing was registered in the Dagster instance either.
    assert main(["runs", "list"]) == 0
    assert capsys.readouterr().out == ""


def test_materialize_dry_select_and_mode(dry_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["materialize", "dry2", "--dry", "--fast", "--select", "routing_dataset"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7  # every stage, then the mode
    selected = [line for line in lines if '"selected": true' in line]
    assert len(selected) == 1 and selected[0].startswith("routing_dataset: ")
    assert "-m modal_jobs.launch.warm modal_jobs.stages.dataset" in selected[0]
    assert lines[-1] == "router_checkpoint mode: fast"
    assert not Volumes.local(dry_env).run("dry2").root.exists()


def test_materialize_rejects_bad_run_name(
    dry_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["materialize", "bad name!", "--dry"]) == 2
    assert "error: invalid run name 'bad name!'" in capsys.readouterr().err


def test_materialize_dry_unknown_backend(
    dry_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOLE_BACKEND", "slurm")
    assert main(["materialize", "dry3", "--dry"]) == 2
    assert "error: MOLE_BACKEND='slurm' is not supported" in capsys.readouterr().err


# --- deploy ----------------------------------------------------------------------------------


def test_deploy_rollback_with_nothing_deployed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--rollback"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    registry = Volumes.local(home).registry
    assert captured.err.startswith(f"error: {registry}: no earlier deployment to roll back to")
    assert not registry.exists()


def test_deploy_needs_a_run_name(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy"]) == 2
    assert "error: mole deploy needs a run name (or --rollback)" in capsys.readouterr().err


# --- route / infer (the happy paths need a trained router: tests/test_serve.py) ----------------


def test_route_with_nothing_deployed(
    home: Path,
    make_config: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(make_config()))
    screen = tmp_path / "shot.png"
    from PIL import Image

    Image.new("RGB", (64, 48), "white").save(screen)
    assert main(["route", str(screen)]) == 2
    registry = Volumes.local(home).registry
    assert (
        f"error: {registry}: no router is deployed; fix: `mole deploy RUN`"
        in capsys.readouterr().err
    )


def test_route_rejects_missing_and_non_image_files(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["route", str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such image file" in capsys.readouterr().err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["infer", str(text), "--prompt", "hi"]) == 2
    assert "notes.png: not a readable PNG or JPEG image" in capsys.readouterr().err
