"""The `mole` command line: demo data, runs, materialization, reports, deployment, inference.

Each command imports what it needs when it runs: `mole deploy --rollback` and `mole report`
only read and write JSON (no dagster, no torch), `mole runs` loads dagster but not torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modal_jobs.config import load_config
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes, check_name

if TYPE_CHECKING:
    import dagster as dg

DEFAULT_TARGET = "eval_report"


class CliError(MoleError):
    """A command-line usage problem."""


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write synthetic expert datasets."""
    from modal_jobs.demo_data import write_demo_data

    counts = write_demo_data(Path(args.out), args.per_expert, args.seed)
    for expert, count in counts.items():
        print(f"{expert}: {count} samples")
    print(f"wrote {sum(counts.values())} samples under {Path(args.out).resolve()}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Add or list run partitions."""
    from mole_assets.instance import instance
    from mole_assets.partitions import RUN_NAMES

    inst = instance()
    if args.runs_command == "add":
        name = check_name(args.name)
        inst.add_dynamic_partitions(RUN_NAMES, [name])
        print(f"added run {name}")
    else:
        for name in inst.get_dynamic_partitions(RUN_NAMES):
            print(name)
    return 0


def ensure_run(inst: dg.DagsterInstance, name: str) -> None:
    """Add the run partition if it does not exist yet."""
    from mole_assets.partitions import RUN_NAMES

    if not inst.has_dynamic_partition(RUN_NAMES, check_name(name)):
        inst.add_dynamic_partitions(RUN_NAMES, [name])
        print(f"added run {name}")


def materialize(
    name: str, selection: Any, mode: str | None = None, train: dict[str, Any] | None = None
) -> dg.ExecuteInProcessResult:
    """Materialize `selection` for the run partition `name` against the instance.

    `mode` is the training mode (`router_checkpoint`'s, and test mode for `expert_adapters`);
    `train` adds other `router_checkpoint` config fields (e.g. `checkpoint_every`).
    """
    import dagster as dg

    from mole_assets.assets import router_assets
    from mole_assets.definitions import defs
    from mole_assets.executor import patient_pool_waits
    from mole_assets.instance import instance
    from mole_assets.jobs import observe_experts_job
    from mole_assets.resources import MoleResource

    inst = instance()
    ensure_run(inst, name)
    # Record the expert datasets' current versions so lineage and staleness reflect this run.
    # A missing expert folder fails its observation; `routing_dataset` then names every defect.
    observe = defs.resolve_job_def(observe_experts_job.name)
    observe.execute_in_process(instance=inst, raise_on_error=False)
    assets = router_assets(load_config())
    selected = dg.AssetSelection.from_coercible(selection).resolve(defs.resolve_asset_graph())
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    ops: dict[str, Any] = {}
    if (mode or train) and dg.AssetKey("router_checkpoint") in selected:
        ops["router_checkpoint"] = {"config": {**({"mode": mode} if mode else {}), **(train or {})}}
    if mode and dg.AssetKey("expert_adapters") in selected:
        # The demo experts have no 20-step variant: `--fast` and `--test` both train a handful.
        ops["expert_adapters"] = {"config": {"mode": "test"}}
    if ops:
        run_config["ops"] = ops
    with patient_pool_waits():  # another run may hold the `gpu` pool's slot
        return dg.materialize(
            assets,
            instance=inst,
            partition_key=name,
            selection=selection,
            resources={"mole": MoleResource()},
            run_config=run_config,
            raise_on_error=False,
            tags={"mole/run": name},
        )


def selection_for(select: str | None) -> dg.AssetSelection:
    """`--select` (Dagster selection syntax) or everything up to the eval report."""
    import dagster as dg

    if select:
        return dg.AssetSelection.from_string(select)
    return dg.AssetSelection.assets(DEFAULT_TARGET).upstream()


def _failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        f"{event.step_key}: {event.step_failure_data.error.message.strip()}"
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.error is not None
    ]


def cmd_materialize(args: argparse.Namespace) -> int:
    """Materialize a run partition (default: everything up to `eval_report`)."""
    name = check_name(args.name)
    mode = "fast" if args.fast else "test" if args.test else None
    selection = selection_for(args.select)
    if args.dry:
        return _dry_run(name, selection, mode)
    result = materialize(name, selection, mode)
    if not result.success:
        for message in _failure_messages(result):
            print(f"failed: {message}", file=sys.stderr)
        return 1
    keys = sorted(
        {
            e.asset_key.to_user_string()
            for e in result.get_asset_materialization_events()
            if e.asset_key is not None
        }
    )
    print(f"run {name}: materialized {', '.join(keys)}")
    return 0


def _dry_run(name: str, selection: dg.AssetSelection, mode: str | None) -> int:
    from modal_jobs.launch.table import STAGES
    from mole_assets.definitions import defs
    from mole_assets.resources import MoleResource

    graph = defs.resolve_asset_graph()
    keys = selection.resolve(graph)
    mole = MoleResource()
    # Every stage is listed with its launcher; `selected` says whether this run would launch it.
    for key in graph.toposorted_asset_keys:
        if key.to_user_string() not in STAGES:
            continue
        plan = {**mole.plan(key.to_user_string(), name), "selected": key in keys}
        print(f"{key.to_user_string()}: {json.dumps(plan, sort_keys=True)}")
    if mode:
        print(f"router_checkpoint mode: {mode}")
    return 0


def _layout(name: str) -> Any:
    return Volumes.local().run(check_name(name))


def cmd_report(args: argparse.Namespace) -> int:
    """Print a run's eval report (markdown, or JSON with --json)."""
    report_dir = _layout(args.name).report
    path = report_dir / ("report.json" if args.json else "report.md")
    if not path.is_file():
        raise CliError(
            f"{path}: no eval report for run {args.name!r}; fix: `mole materialize {args.name}`"
        )
    print(path.read_text().rstrip())
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy a run's router (or roll back to the previous deployment)."""
    from modal_jobs.launch import modal_cli
    from modal_jobs.serving.registry import read_registry, rollback

    volumes = Volumes.local()
    if args.rollback:
        # On Modal the registry lives on the inference volume: roll back in the deploy container.
        on_modal = os.environ.get("MOLE_BACKEND") == "modal"
        current = modal_cli.rollback() if on_modal else rollback(volumes)
        print(f"rolled back: current router is {current}")
        return 0
    if not args.name:
        raise CliError("mole deploy needs a run name (or --rollback)")
    result = materialize(args.name, selection_for("deployed_router"))
    if not result.success:
        for message in _failure_messages(result):
            print(f"failed: {message}", file=sys.stderr)
        return 1
    print(f"deployed: current router is {read_registry(volumes)['current']}")
    return 0


def _stack() -> Any:
    from modal_jobs.serving.inference import Stack

    return Stack.deployed(Volumes.local(), load_config())


def _read_image(path: str) -> Any:
    from modal_jobs.serving.serve import load_image

    file = Path(path)
    if not file.is_file():
        raise CliError(f"{file}: no such image file")
    return load_image(file.read_bytes(), str(file))


def cmd_route(args: argparse.Namespace) -> int:
    """Route one screenshot with the deployed router (one forward pass)."""
    image = _read_image(args.image)
    route = _stack().route(image, args.prompt)
    if args.json:
        print(json.dumps(route.to_json(), indent=2))
        return 0
    state = "abstained → base model" if route.abstained else f"adapter {route.adapter}"
    print(f"expert: {route.expert} ({state}; temperature {route.temperature:.3f})")
    for expert, p in sorted(route.probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {expert:<14} {p:.4f}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Route one screenshot, then answer with the routed expert's adapter active."""
    image = _read_image(args.image)
    answer = _stack().infer(image, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps(answer.to_json(), indent=2))
        return 0
    route = answer.route
    print(f"expert: {route.expert} (p={route.probabilities[route.expert]:.3f})")
    print(f"adapter: {answer.adapter or 'none (base model)'}")
    print(f"answer: {answer.answer}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve /route, /infer, /health and /metrics (ASGI app on uvicorn) until interrupted."""
    import logging
    import socket

    import uvicorn

    from modal_jobs.serving.app import create_app
    from modal_jobs.serving.live import Deployment, Live
    from modal_jobs.serving.serve import ServeOptions

    try:
        options = ServeOptions(args.batch_wait_ms, args.max_batch, not args.no_feature_reuse)
    except ValueError as exc:
        raise CliError(f"mole serve: {exc}") from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    deployment = Deployment(Volumes.local(), load_config())
    app = create_app(Live.deployed(deployment, args.reload_every), options)
    # Bound here so that the port (0: any free one) is known before uvicorn starts.
    sock = socket.create_server((args.host, args.port))
    endpoints = "POST /route, POST /infer, GET /health, GET /metrics"
    print(f"serving on http://{args.host}:{sock.getsockname()[1]} ({endpoints})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def _inference_commands(sub: Any) -> None:
    from modal_jobs.serving.serve import RELOAD_EVERY_S, ServeOptions

    route = sub.add_parser("route", help="route a screenshot with the deployed router")
    route.add_argument("image")
    route.add_argument("--prompt", default="", help="the user's instruction (optional)")
    route.add_argument("--json", action="store_true")
    route.set_defaults(func=cmd_route)

    infer = sub.add_parser("infer", help="route, then answer with the routed expert")
    infer.add_argument("image")
    infer.add_argument("--prompt", required=True, help="the user's instruction")
    infer.add_argument("--max-new-tokens", type=int, default=48)
    infer.add_argument("--json", action="store_true")
    infer.set_defaults(func=cmd_infer)

    serve = sub.add_parser("serve", help="HTTP API: /route, /infer, /health, /metrics")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=ServeOptions.batch_wait_ms,
        help="how long concurrent requests are gathered into one batch (0: no batching)",
    )
    serve.add_argument("--max-batch", type=int, default=ServeOptions.max_batch)
    serve.add_argument(
        "--no-feature-reuse",
        action="store_true",
        help="run the vision tower again for the answer (the unoptimised baseline)",
    )
    serve.add_argument(
        "--reload-every",
        type=float,
        default=RELOAD_EVERY_S,
        metavar="SECONDS",
        help="how often to check for a newly deployed router and swap it in (0: never)",
    )
    serve.set_defaults(func=cmd_serve)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    root = argparse.ArgumentParser(prog="mole", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write synthetic expert datasets")
    demo.add_argument("--out", required=True)
    demo.add_argument("--per-expert", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    runs = sub.add_parser("runs", help="run partitions in the Dagster instance")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    add = runs_sub.add_parser("add", help="add a run partition")
    add.add_argument("name")
    runs_sub.add_parser("list", help="list run partitions")
    runs.set_defaults(func=cmd_runs)

    mat = sub.add_parser("materialize", help="materialize a run's assets")
    mat.add_argument("name")
    mat.add_argument("--select", help="Dagster asset selection (default: up to eval_report)")
    modes = mat.add_mutually_exclusive_group()
    modes.add_argument("--fast", action="store_true", help="train 20 steps")
    modes.add_argument("--test", action="store_true", help="train on a small subset")
    mat.add_argument("--dry", action="store_true", help="print what would run, run nothing")
    mat.set_defaults(func=cmd_materialize)

    rep = sub.add_parser("report", help="print a run's eval report")
    rep.add_argument("name")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_report)

    dep = sub.add_parser("deploy", help="deploy a run's router")
    dep.add_argument("name", nargs="?")
    dep.add_argument("--rollback", action="store_true", help="restore the previous router")
    dep.set_defaults(func=cmd_deploy)

    _inference_commands(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a `MoleError` becomes `error: ...` and exit status 2."""
    args = parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
