"""`mole serve` under concurrent HTTP load: batching + feature reuse vs both off; ONE JSON object.

Needs a deployed router under MOLE_HOME (`make demo` does it). Two real servers run side by side
on free 127.0.0.1 ports, from the same deployment: `ours` (`mole serve`, its defaults: dynamic
batching and vision features reused from the route for the answer) and `baseline`
(`--batch-wait-ms 0 --no-feature-reuse`: one request per forward and the vision tower run again
for the answer, as the server did before batching). An aiohttp load generator keeps 1, 4 and 16
clients busy (each sends its next request when its answer arrives) on `/route` and `/infer`, with
fresh synthetic screens of every expert. Each measurement is short rounds that alternate between
the two servers (the order flips every round), so a burst of other load on a shared machine hits
both; a round stops after `--requests` answers or `--round-seconds`. Reported per endpoint,
clients and server: requests/s (completed / wall time, all rounds) and p50/p95/p99 latency;
`*_speedup_*` = the median over rounds of ours/baseline requests/s. Answers of the two servers to
the same request are compared (`answers_identical`).

    MOLE_HOME=.mole python benchmarks/serve.py [--rounds 3] [--requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from modal_jobs.demo_data import EXPERTS, render_sample
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes
from modal_jobs.serving.registry import current_router

SERVERS = {"ours": [], "baseline": ["--batch-wait-ms", "0", "--no-feature-reuse"]}
CLIENTS = (1, 4, 16)
ENDPOINTS = ("/route", "/infer")


@dataclass
class Tally:
    """What one (endpoint, clients, server) measurement saw over its rounds."""

    latencies: list[float] = field(default_factory=list)
    done: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)

    def add(self, latencies: list[float], wall: float) -> None:
        """Count one round."""
        self.latencies += latencies
        self.done += len(latencies)
        self.seconds += wall
        self.round_rates.append(len(latencies) / wall)

    def summary(self) -> dict[str, Any]:
        """Requests/s and latency percentiles in ms."""
        ms = np.array(self.latencies) * 1000
        return {
            "requests": self.done,
            "requests_per_s": self.done / self.seconds,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)},
        }


def bodies(count: int, seed: int) -> list[bytes]:
    """JSON bodies of fresh synthetic screens, experts in turn, each with its instruction."""
    out = []
    for n in range(count):
        sample = render_sample(EXPERTS[n % len(EXPERTS)], random.Random(f"serve-bench:{seed}:{n}"))
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        out.append(json.dumps({"image": image, "prompt": sample.instruction}).encode())
    return out


async def load_round(
    url: str,
    requests: Sequence[tuple[int, bytes]],
    clients: int,
    seconds: float,
    answers: dict[int, Any],
) -> tuple[list[float], float]:
    """`clients` busy clients through `requests` (or until `seconds`): latencies, wall time."""
    latencies: list[float] = []
    queue = list(requests)  # (index into the work list, body): answers are keyed by request
    began = time.perf_counter()
    deadline = began + seconds
    limits = aiohttp.TCPConnector(limit=clients)
    # A batch of /infer answers on a loaded CPU can take minutes: only a hung server times out.
    timeout = aiohttp.ClientTimeout(total=max(seconds, 600))
    async with aiohttp.ClientSession(connector=limits, timeout=timeout) as session:

        async def client() -> None:
            while queue and time.perf_counter() < deadline:
                index, body = queue.pop(0)
                sent = time.perf_counter()
                payload = await post(session, url, body)
                latencies.append(time.perf_counter() - sent)
                answers.setdefault(index, payload.get("answer", payload.get("expert")))

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - began


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    async with session.post(url, data=body) as response:
        payload: dict[str, Any] = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {payload}")
    return payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def servers(log_dir: Path) -> Iterator[dict[str, str]]:
    """Both servers started (and stopped afterwards); their base URLs by name."""
    processes, urls = [], {}
    try:
        for name, flags in SERVERS.items():
            port = free_port()
            sink = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            command = [sys.executable, "-m", "mole_assets.cli", "serve", "--port", str(port)]
            processes.append((subprocess.Popen([*command, *flags], stdout=sink, stderr=sink), sink))
            urls[name] = f"http://127.0.0.1:{port}"
        for (process, _), (name, url) in zip(processes, urls.items(), strict=True):
            wait_healthy(url, process, log_dir / f"{name}.log")
        yield urls
    finally:
        for process, sink in processes:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            sink.close()


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server at {url} not healthy after 180 s")


def measure(urls: dict[str, str], work: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Every endpoint × clients, alternating servers round by round."""
    results: dict[str, Any] = {"answers_identical": {}}
    for endpoint in ENDPOINTS:
        answers: dict[str, dict[int, Any]] = {name: {} for name in urls}
        for clients in CLIENTS:
            tallies = {name: Tally() for name in urls}
            for round_ in range(args.rounds):
                start = (round_ * args.requests) % len(work)
                chunk = [
                    (n % len(work), work[n % len(work)])
                    for n in range(start, start + args.requests)
                ]
                order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                run_round(urls, order, endpoint, chunk, clients, args, tallies, answers)
            rates = zip(tallies["ours"].round_rates, tallies["baseline"].round_rates, strict=True)
            ratios = [ours / base for ours, base in rates]
            results[f"{endpoint.strip('/')}_{clients}"] = {
                **{name: tally.summary() for name, tally in tallies.items()},
                "speedup_rounds": ratios,
                "speedup": float(np.median(ratios)),
            }
            # Progress on stderr (stdout stays ONE JSON object): a long run shows where it is.
            print(
                json.dumps({f"{endpoint}@{clients}": results[f"{endpoint.strip('/')}_{clients}"]}),
                file=sys.stderr,
                flush=True,
            )
        shared = set(answers["ours"]) & set(answers["baseline"])
        same = [answers["ours"][n] == answers["baseline"][n] for n in shared]
        results["answers_identical"][endpoint.strip("/")] = float(np.mean(same))
    return results


def run_round(
    urls: dict[str, str],
    order: list[str],
    endpoint: str,
    chunk: list[tuple[int, bytes]],
    clients: int,
    args: argparse.Namespace,
    tallies: dict[str, Tally],
    answers: dict[str, dict[int, Any]],
) -> None:
    """One round: the same requests against each server in turn."""
    for name in order:
        url = urls[name] + endpoint
        figures = load_round(url, chunk, clients, args.round_seconds, answers[name])
        tallies[name].add(*asyncio.run(figures))


def warm_up(urls: dict[str, str], work: list[bytes]) -> None:
    """First calls pay one-time set-up (allocations, kernels): not measured."""
    for endpoint in ENDPOINTS:
        for url in urls.values():
            asyncio.run(load_round(url + endpoint, list(enumerate(work)), 4, 60, {}))


def main() -> int:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="answers per round at most")
    parser.add_argument("--round-seconds", type=float, default=20.0, help="a round's time limit")
    args = parser.parse_args()
    try:
        router = current_router(Volumes.local()).name
    except MoleError as exc:
        print(json.dumps({"error": f"{exc} (run `make demo` first)"}))
        return 2
    work = bodies(max(args.requests, 16) * 2, seed=0)
    with (
        tempfile.TemporaryDirectory(prefix="mole-serve-bench-") as logs,
        servers(Path(logs)) as urls,
    ):
        warm_up(urls, work[:8])
        figures = measure(urls, work, args)
    p95_1 = figures["route_1"]
    result = {
        "benchmark": "serve",
        "router": router,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "servers": {name: " ".join(["mole serve", *flags]) for name, flags in SERVERS.items()},
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "route_speedup_16": figures["route_16"]["speedup"],
        "infer_speedup_1": figures["infer_1"]["speedup"],
        "infer_speedup_16": figures["infer_16"]["speedup"],
        "route_p95_ratio_1": p95_1["ours"]["p95_ms"] / p95_1["baseline"]["p95_ms"],
        **figures,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
