"""Writing demo data sets in the expert dataset layout, each expert folder swapped in whole."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from modal_jobs.demo_data.screen import EXPERTS, Sample, render_sample
from modal_jobs.ml.conditions import GENERIC_TRAIN, pick

_PNG_COMPRESS_LEVEL = 3
# Real users send app-specific requests, generic ones and bare screenshots: so do the demo's,
# so that no instruction identifies an expert by itself and the screen has to decide.
GENERIC_SHARE = 0.2
SCREEN_ONLY_SHARE = 0.15


def user_instruction(sample: Sample, seed: int, expert: str, i: int) -> str:
    """The instruction stored for sample `i`: its own, a generic one or none (empty)."""
    key = f"{seed}:{expert}:{i}:instruction"
    draw = _sample_rng(seed, f"{expert}:instruction", i).random()
    if draw < GENERIC_SHARE:
        return pick(GENERIC_TRAIN, key)
    if draw < GENERIC_SHARE + SCREEN_ONLY_SHARE:
        return ""
    return sample.instruction


def _sample_rng(seed: int, expert: str, i: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{expert}:{i}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _write_expert(out: Path, expert: str, per_expert: int, seed: int) -> int:
    tmp = out / f".{expert}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = tmp / "datasets"
        (ds / "images").mkdir(parents=True)
        lines = []
        for i in range(per_expert):
            sample = render_sample(expert, _sample_rng(seed, expert, i))
            rel = f"images/{i:05d}.png"
            sample.image.save(
                ds / rel, format="PNG", optimize=False, compress_level=_PNG_COMPRESS_LEVEL
            )
            record = {
                "id": f"{expert}-{seed}-{i:05d}",
                "image": rel,
                "messages": [
                    {"role": "user", "content": user_instruction(sample, seed, expert, i)},
                    {"role": "assistant", "content": sample.answer},
                ],
            }
            lines.append(json.dumps(record, ensure_ascii=False))
        (ds / "demo.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _swap_in(tmp, out / expert)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return per_expert


def _swap_in(new: Path, final: Path) -> None:
    """Move the completed ``new`` folder to ``final``, replacing any previous version."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_demo_data(
    out: Path, per_expert: int, seed: int, experts: Sequence[str] = EXPERTS
) -> dict[str, int]:
    """Write ``per_expert`` samples for every expert under ``out``.

    Each expert gets ``<out>/<expert>/datasets/demo.jsonl`` plus ``images/NNNNN.png`` next to
    it. Every expert folder is built in a hidden temporary sibling and moved into place only
    when complete, replacing an existing folder; on error the temporary folder is removed.

    Args:
        out: Root folder (created if missing).
        per_expert: Samples per expert, at least 1.
        seed: Base seed; sample ``i`` of ``expert`` depends only on ``(seed, expert, i)``.
        experts: Which experts to write (each must be in ``EXPERTS``).

    Returns:
        Number of samples written per expert.

    Raises:
        ValueError: If ``per_expert < 1`` or an expert is unknown.

    """
    if per_expert < 1:
        raise ValueError(f"per_expert must be at least 1, got {per_expert}")
    unknown = [e for e in experts if e not in EXPERTS]
    if unknown:
        raise ValueError(f"unknown expert(s) {unknown}; known experts: {', '.join(EXPERTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {e: _write_expert(out, e, per_expert, seed) for e in dict.fromkeys(experts)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write a demo data set and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output root folder")
    parser.add_argument("--per-expert", type=int, default=100, help="samples per expert")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--experts", nargs="+", default=list(EXPERTS), choices=EXPERTS)
    args = parser.parse_args(argv)
    counts = write_demo_data(args.out, args.per_expert, args.seed, args.experts)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
