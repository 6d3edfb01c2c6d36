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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modal_jobs.config import load_config
from modal_jobs.demo_data import render_sample
from modal_jobs.layout import Volumes
from modal_jobs.ml.calibration import ECE_BINS
from modal_jobs.serving.batched import Prepared
from modal_jobs.serving.inference import Answer, Route, Stack
from mole_assets.cli import main

from .conftest import TRAINED_RUN as RUN
from .conftest import TrainedRun

HELD_OUT_SEED = 424242


@dataclass
class Deployed:
    config_dir: Path
    volumes: Volumes
    env: dict[str, str]
    screens: dict[str, Path]
    prompts: dict[str, str]


@pytest.fixture(scope="module")
def deployed(trained_run: TrainedRun) -> Deployed:
    root = trained_run.root
    screens, prompts = {}, {}
    for expert in ("calendar", "terminal", "spreadsheet"):
        sample = render_sample(expert, random.Random(f"{HELD_OUT_SEED}:{expert}"))
        screens[expert] = root / f"{expert}.png"
        sample.image.save(screens[expert])
        prompts[expert] = sample.instruction
    env = {**os.environ, "MOLE_CONFIG_DIR": str(trained_run.config_dir)}
    return Deployed(trained_run.config_dir, Volumes.local(), env, screens, prompts)


def _mole(deployed: Deployed, *args: str) -> subprocess.CompletedProcess[str]:
    """`mole <args>` as a user runs it: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "mole_assets.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=deployed.env,
        check=False,
    )


def _mole_here(
    deployed: Deployed,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> tuple[int, str]:
    """`mole <args>` through the CLI's entry point in this process (no interpreter to start):
    its exit status and what it printed."""
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(deployed.config_dir))
    code = main(list(args))
    return code, capsys.readouterr().out


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


def test_route_held_out_screens(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for expert, screen in deployed.screens.items():
        prompt = deployed.prompts[expert]
        code, out = _mole_here(
            deployed, monkeypatch, capsys, "route", str(screen), "--prompt", prompt, "--json"
        )
        assert code == 0
        route = json.loads(out)
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
    stack = Stack.deployed(deployed.volumes, load_config(deployed.config_dir))
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
    assert ood["score"] in ood["candidates"] and len(ood["candidates"]) == 5
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


def test_unknown_screens_abstain_and_infer_uses_the_bare_base(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blank screen and noise are no expert's: route abstains, infer runs no adapter."""
    rng = np.random.default_rng(7)
    screens = {
        "blank": Image.new("RGB", (800, 500), "white"),
        "noise": Image.fromarray(rng.integers(0, 256, (500, 800, 3), dtype=np.uint8)),
    }
    for name, image in screens.items():
        path = deployed.screens["calendar"].with_name(f"{name}.png")
        image.save(path)
        code, out = _mole_here(deployed, monkeypatch, capsys, "route", str(path), "--json")
        assert code == 0
        route = json.loads(out)
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


def _truncated(encoded: str) -> str:
    data = base64.b64decode(encoded)
    return base64.b64encode(data[: len(data) // 2]).decode()


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
        # A PNG whose header reads but whose pixel data stops short (libspng, then Pillow, fail).
        "truncated PNG": (
            "/route",
            json.dumps({"image": _truncated(_png(Image.effect_noise((64, 48), 60)))}).encode(),
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


# --- batching, feature reuse and metrics -------------------------------------------------------


def _requests(stack: Stack, deployed: Deployed) -> tuple[list[Prepared], list[tuple[Any, str]]]:
    """Mixed /infer and /route requests on held-out screens of several sizes and prompts."""
    from modal_jobs.serving.batched import prepare

    inputs = []
    for n, expert in enumerate(("calendar", "terminal", "spreadsheet", "email", "map", "calendar")):
        sample = render_sample(expert, random.Random(f"{HELD_OUT_SEED}:batch:{n}"))
        # Different sizes and prompts give rows of different lengths: padding is exercised.
        side = 160 + 32 * n
        inputs.append(
            (sample.image.convert("RGB").resize((side, side * 3 // 4)), sample.instruction)
        )
    requests = [
        # Both calendar screens (0 and 5) are /infer: one adapter group of two rows of different
        # lengths; 2 and 3 are /route only.
        prepare(stack, image, prompt, answer=n not in (2, 3))
        for n, (image, prompt) in enumerate(inputs)
    ]
    return requests, inputs


@pytest.fixture(scope="module")
def stack(deployed: Deployed) -> Stack:
    return Stack.deployed(deployed.volumes, load_config(deployed.config_dir))


@contextmanager
def _vision_calls(stack: Stack) -> Iterator[list[int]]:
    """A list that grows by one entry per vision-tower call (a real forward hook)."""
    from modal_jobs.ml.model import causal_lm

    calls: list[int] = []
    hook = causal_lm(stack.model).model.visual.register_forward_hook(
        lambda module, args, output: calls.append(1)
    )
    try:
        yield calls
    finally:
        hook.remove()


def test_batched_answers_match_one_at_a_time(stack: Stack, deployed: Deployed) -> None:
    from modal_jobs.serving.batched import run_batch

    requests, inputs = _requests(stack, deployed)
    sizes: list[tuple[str, int]] = []
    with _vision_calls(stack) as calls:
        batched = run_batch(stack, requests, True, lambda kind, size: sizes.append((kind, size)))
    # One vision-tower run for the whole batch: the answers reuse the route's features.
    assert len(calls) == 1
    answers = [r for r in batched if isinstance(r, Answer)]
    groups = [size for kind, size in sizes if kind == "answer"]
    assert sizes[0] == ("route", len(requests)) and sum(groups) == len(answers) == 4
    assert max(groups) > 1, "no adapter group of two: left padding is not exercised"
    with _vision_calls(stack) as calls:
        for request, result, (image, prompt) in zip(requests, batched, inputs, strict=True):
            alone = run_batch(stack, [request], False)[0]
            # The old path, Stack.route / Stack.infer, runs the vision tower in each step.
            old = stack.infer(image, prompt) if request.answer_item else stack.route(image, prompt)
            for other in (alone, old):
                _assert_same(result, other)
    # Without reuse an /infer runs the tower twice (route, then generate), a /route once.
    assert len(calls) == 2 * (2 * len(answers) + (len(requests) - len(answers)))


def _assert_same(result: Route | Answer, other: Route | Answer) -> None:
    if isinstance(result, Answer):
        assert isinstance(other, Answer) and other.answer == result.answer
        assert other.adapter == result.adapter
        mine, theirs = result.route.probabilities, other.route.probabilities
    else:
        assert isinstance(other, Route) and other.adapter == result.adapter
        mine, theirs = result.probabilities, other.probabilities
    routes = [r.route if isinstance(r, Answer) else r for r in (result, other)]
    assert routes[0].abstained == routes[1].abstained
    assert mine == pytest.approx(theirs, abs=1e-5)


def test_batcher_gathers_queued_requests_into_one_forward(stack: Stack, deployed: Deployed) -> None:
    import asyncio

    from modal_jobs.serving.batcher import Batcher
    from modal_jobs.serving.serve import ServeOptions

    requests, _ = _requests(stack, deployed)

    async def serve(options: ServeOptions) -> list[tuple[str, int]]:
        sizes: list[tuple[str, int]] = []
        batcher = Batcher(options, lambda kind, size: sizes.append((kind, size)))
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            await batcher.stop()
        assert len(results) == len(requests)
        return sizes

    batched = asyncio.run(serve(ServeOptions(batch_wait_ms=50, max_batch=4)))
    assert [size for kind, size in batched if kind == "route"] == [4, 2]
    unbatched = asyncio.run(serve(ServeOptions(batch_wait_ms=0)))
    assert [size for kind, size in unbatched if kind == "route"] == [1] * len(requests)


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_http_concurrent_requests_and_metrics(server: str, deployed: Deployed) -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = _metrics(server)
    with Image.open(deployed.screens["spreadsheet"]) as image:
        body = json.dumps({"image": _png(image), "prompt": deployed.prompts["spreadsheet"]})
    status, alone = _call(server, "POST", "/infer", body.encode())
    assert status == 200
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(lambda _: _call(server, "POST", "/infer", body.encode()), range(6))
        )
    assert all(s == 200 and a["answer"] == alone["answer"] for s, a in together), together
    status, _ = _call(server, "POST", "/route", b"{not json")
    assert status == 400
    after = _metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('mole_requests_total{endpoint="/infer",status="200"}') == 7
    assert delta('mole_request_errors_total{endpoint="/route"}') == 1
    assert delta('mole_request_seconds_count{endpoint="/infer"}') == 7
    expert = alone["route"]["expert"]
    assert delta(f'mole_routed_total{{expert="{expert}"}}') == 7
    abstained = 7 if alone["route"]["abstained"] else 0
    assert delta("mole_abstentions_total") == abstained
    # Seven /infer requests went through some number of routing forwards (batched or not).
    assert delta('mole_batch_size_sum{kind="route"}') == 7
    assert 1 <= delta('mole_batch_size_count{kind="route"}') <= 7


def test_live_swaps_in_a_new_deployment_and_serves_on_through_a_broken_one(
    deployed: Deployed,
) -> None:
    import shutil

    from modal_jobs.atomic import write_json
    from modal_jobs.serving.live import Deployment, Live
    from modal_jobs.serving.registry import read_registry

    volumes = deployed.volumes
    saved = read_registry(volumes)
    live = Live.deployed(Deployment(volumes, load_config(deployed.config_dir)), 0)
    serving = live.version
    assert serving == saved["current"] and not live.check()  # nothing new
    try:
        # A deployment whose folder cannot be loaded (no router.json): the old router stays.
        (volumes.routers / "broken-000").mkdir()
        write_json(volumes.registry, {**saved, "current": "broken-000"})
        assert not live.check() and (live.version, live.failures, live.swaps) == (serving, 1, 0)
        assert not live.check() and live.failures == 1  # not retried until the registry moves
        # A loadable one: swapped in; the stack before it is left to requests still on it.
        before = live.stack
        shutil.copytree(volumes.routers / serving, volumes.routers / "again-111")
        write_json(volumes.registry, {**saved, "current": "again-111"})
        assert live.check() and (live.version, live.swaps) == ("again-111", 1)
        assert live.stack is not before and before.router.folder.name == serving
    finally:
        write_json(volumes.registry, saved)
        for name in ("broken-000", "again-111"):
            shutil.rmtree(volumes.routers / name, ignore_errors=True)
