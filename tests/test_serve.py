"""Stacked inference end to end: a run trained well enough to route, deployed, then `mole route`,
`mole infer` and `mole serve` (a real HTTP server on a free 127.0.0.1 port) against it."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modal_jobs.config import load_config
from modal_jobs.demo_data import render_sample
from modal_jobs.layout import Volumes
from modal_jobs.ml.calibration import ECE_BINS
from modal_jobs.serving.inference import Stack

from .conftest import fresh_instance, write_config
from .test_graph import _materialize

RUN = "serve-test"
# Enough router steps on the small test data to route held-out screens reliably (test mode's
# 8 steps on 48 samples is near chance); the demo experts only need to exist here.
TRAIN = {
    "ops": {
        "router_checkpoint": {"config": {"mode": "full", "steps": 240}},
        "expert_adapters": {"config": {"mode": "test"}},
    }
}
HELD_OUT_SEED = 424242


@dataclass
class Deployed:
    config_dir: Path
    volumes: Volumes
    env: dict[str, str]
    screens: dict[str, Path]
    prompts: dict[str, str]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, experts_dir: Path) -> Deployed:
    root = tmp_path_factory.mktemp("serve")
    instance = fresh_instance(root, RUN)
    config_dir = write_config(root / "config", experts_dir, min_accuracy=0.0)
    selection = dg.AssetSelection.assets("deployed_router").upstream()
    result = _materialize(instance, config_dir, selection, TRAIN, run=RUN)
    assert result.success
    screens, prompts = {}, {}
    for expert in ("calendar", "terminal", "spreadsheet"):
        sample = render_sample(expert, random.Random(f"{HELD_OUT_SEED}:{expert}"))
        screens[expert] = root / f"{expert}.png"
        sample.image.save(screens[expert])
        prompts[expert] = sample.instruction
    env = {**os.environ, "MOLE_CONFIG_DIR": str(config_dir)}
    return Deployed(config_dir, Volumes.local(), env, screens, prompts)


def _mole(deployed: Deployed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mole_assets.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=deployed.env,
        check=False,
    )


def test_report_has_calibration_latency_and_end_to_end(deployed: Deployed) -> None:
    report = json.loads((deployed.volumes.run(RUN).report / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["ece_bins"] == ECE_BINS
    assert 0.0 <= calibration["ece_after"] <= 1.0 and calibration["temperature"] > 0
    assert len(calibration["risk_coverage"]["coverage"]) == report["n"]
    assert report["latency_batch1"]["images"] > 0 and report["latency_batch1"]["p95_ms"] > 0
    end = report["end_to_end"]
    assert end["n"] == report["n"] and {"routed", "oracle", "base"} <= set(end)
    for figure in ("reliability.png", "risk_coverage.png", "confusion_matrix.png"):
        assert (deployed.volumes.run(RUN).report / figure).read_bytes().startswith(b"\x89PNG")
    current = json.loads(deployed.volumes.registry.read_text())["current"]
    router = json.loads((deployed.volumes.routers / current / "router.json").read_text())
    assert router["temperature"] == calibration["temperature"]


def test_route_held_out_screens(deployed: Deployed) -> None:
    for expert, screen in deployed.screens.items():
        done = _mole(deployed, "route", str(screen), "--prompt", deployed.prompts[expert], "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        route = json.loads(done.stdout)
        assert route["expert"] == expert, route
        assert abs(sum(route["probabilities"].values()) - 1.0) < 1e-6
        assert set(route["probabilities"]) == set(load_config(deployed.config_dir).dataset.experts)
        assert route["temperature"] > 0 and isinstance(route["abstained"], bool)


def test_infer_runs_the_routed_expert_adapter(deployed: Deployed) -> None:
    screen, prompt = deployed.screens["calendar"], deployed.prompts["calendar"]
    done = _mole(deployed, "infer", str(screen), "--prompt", prompt, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    route = answer["route"]
    assert route["expert"] == "calendar"
    expected = None if route["abstained"] else "calendar"
    assert answer["adapter"] == route["adapter"] == expected
    # The same answer comes out when that adapter is activated by hand: it is the one that ran.
    stack = Stack.deployed(load_config(deployed.config_dir), deployed.volumes)
    with Image.open(screen) as image:
        rgb = image.convert("RGB")
    from modal_jobs.ml.batching import encode

    item = encode(stack.processor, rgb, stack.router.bounds, None, prompt, None)
    with stack.adapter(answer["adapter"]):
        assert stack.generate([item], 48)[0] == answer["answer"]


def test_report_per_condition_and_abstention(deployed: Deployed) -> None:
    """`mole report --json` carries every prompt condition and the held-out abstention figures."""
    done = _mole(deployed, "report", RUN, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for condition in ("instruction", "generic", "none"):
        row = report["conditions"][condition]
        assert {"accuracy", "macro_f1", "ece"} <= set(row) and row["n"] == report["n"]
    # The own-instruction condition is the headline accuracy, scored on the same screenshots.
    assert report["conditions"]["instruction"]["accuracy"] == report["accuracy"]
    ood = report["ood"]
    assert {"auroc", "abstain_rate", "coverage", "selective_accuracy", "n"} <= set(ood)
    assert ood["score"] in ood["candidates"] and len(ood["candidates"]) == 4
    threshold = ood["threshold"]
    assert ood["abstain_rate"] == np.mean(np.array(ood["scores"]["out"]) < threshold)
    assert ood["coverage"] == np.mean(np.array(ood["scores"]["in"]) >= threshold)
    frame = pd.read_csv(deployed.volumes.run(RUN).report / "predictions.csv")
    assert len(frame) == 3 * report["n"] + ood["n"]
    assert {"id", "expert", "routed", "probabilities", "abstained", "condition"} <= set(frame)
    held_out = frame[frame["kind"] != "expert"]
    assert held_out["abstained"].mean() == pytest.approx(ood["abstain_rate"])
    current = json.loads(deployed.volumes.registry.read_text())["current"]
    router = json.loads((deployed.volumes.routers / current / "router.json").read_text())
    assert router["ood"] == ood["router"]


def test_unknown_screens_abstain_and_infer_uses_the_bare_base(deployed: Deployed) -> None:
    """A blank screen and noise are no expert's: route abstains, infer runs no adapter."""
    rng = np.random.default_rng(7)
    screens = {
        "blank": Image.new("RGB", (800, 500), "white"),
        "noise": Image.fromarray(rng.integers(0, 256, (500, 800, 3), dtype=np.uint8)),
    }
    for name, image in screens.items():
        path = deployed.screens["calendar"].with_name(f"{name}.png")
        image.save(path)
        done = _mole(deployed, "route", str(path), "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        route = json.loads(done.stdout)
        assert route["abstained"] is True and route["adapter"] is None, (name, route)
    done = _mole(deployed, "infer", str(path), "--prompt", "What is this?", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["route"]["abstained"] is True and answer["adapter"] is None


# --- HTTP API ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(deployed: Deployed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    # A file, not a pipe: a pipe nobody reads fills up with request logs and blocks the server.
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "mole_assets.cli", "serve", "--port", str(port)],
            env=deployed.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                _call(url, "GET", "/health")
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _call(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_http_route_and_infer(server: str, deployed: Deployed) -> None:
    with Image.open(deployed.screens["terminal"]) as image:
        encoded = _png(image)
    prompt = deployed.prompts["terminal"]
    status, route = _call(
        server, "POST", "/route", json.dumps({"image": encoded, "prompt": prompt}).encode()
    )
    assert status == 200 and route["expert"] == "terminal"
    assert abs(sum(route["probabilities"].values()) - 1.0) < 1e-6
    status, answer = _call(
        server, "POST", "/infer", json.dumps({"image": encoded, "prompt": prompt}).encode()
    )
    assert status == 200 and answer["route"]["expert"] == "terminal"
    assert answer["adapter"] == answer["route"]["adapter"] and isinstance(answer["answer"], str)


def test_http_bad_requests_get_4xx_json_and_server_stays_healthy(server: str) -> None:
    small = _png(Image.new("RGB", (64, 48), "white"))
    huge = _png(Image.new("RGB", (5000, 4000), "white"))
    cases = {
        "bad JSON": ("/route", b"{not json", 400),
        "not an object": ("/route", b"[1, 2]", 400),
        "missing image": ("/route", json.dumps({"prompt": "x"}).encode(), 400),
        "not base64": ("/route", json.dumps({"image": "%%%"}).encode(), 400),
        "not an image": (
            "/route",
            json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(),
            400,
        ),
        "missing prompt": ("/infer", json.dumps({"image": small}).encode(), 400),
        "huge image": ("/route", json.dumps({"image": huge}).encode(), 413),
        "unknown endpoint": ("/nope", json.dumps({"image": small}).encode(), 404),
    }
    for name, (path, body, expected) in cases.items():
        status, payload = _call(server, "POST", path, body)
        assert status == expected, (name, status, payload)
        assert payload["status"] == expected and payload["error"], name
    status, payload = _call(server, "POST", "/route", b"x" * (9 * 1024 * 1024))
    assert status == 413 and "limit" in payload["error"]
    status, health = _call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["router"].startswith(RUN) and len(health["adapters"]) == 6
