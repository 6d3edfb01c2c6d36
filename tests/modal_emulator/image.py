"""What a `modal.Image` holds, read offline: its Dockerfile lines and the Python sources it adds.

Modal builds an image from the layers' Dockerfile commands (modal/_image.py: each layer's
`_from_args(..., dockerfile_function=...)`, called with the builder version when the image is
loaded) plus the `add_local_python_source` mounts, attached at container start under `/root`
(`_Image.add_local_python_source`, `_added_python_source_set`). The emulator cannot build images;
it reads these definitions to give a container the image's environment and sources, and to
refuse builds that cannot work.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shlex
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The builder version whose Dockerfile lines we read (any recent one yields the same commands).
BUILDER_VERSION = "2025.06"
# Modal's default PATH inside containers (debian_slim and registry images with add_python).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """An image that would not build on Modal (the emulator's check)."""


def _raw(obj: Any) -> Any:
    """The `modal._image._Image` behind synchronicity's `modal.Image` wrapper."""
    original = [key for key in vars(obj) if key.startswith("_sync_original")]
    return getattr(obj, original[0]) if original else obj


def _cells(function: Any) -> dict[str, Any]:
    closure = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, [c.cell_contents for c in closure], strict=True))


def _commands(image: Any) -> list[str]:
    cells = _cells(_raw(image)._load)
    if "base_image" in cells:  # an add_local_* mount layer: no Dockerfile lines of its own
        return _commands(cells["base_image"])
    if "single_layer_image" in cells:  # from_registry(add_python=...): same lines either way
        return _commands(cells["single_layer_image"])
    lines: list[str] = []
    for base in (cells.get("base_images") or {}).values():
        lines += _commands(base)
    build = cells.get("dockerfile_function")
    if build is not None:
        lines += [line for line in build(BUILDER_VERSION).commands if line != "FROM base"]
    return lines


@dataclass(frozen=True)
class ImageDefinition:
    """An image's Dockerfile lines (base first) and the local Python sources it adds."""

    commands: tuple[str, ...]
    python_sources: frozenset[str]

    @classmethod
    def of(cls, image: Any) -> ImageDefinition:
        """Read `image` (a `modal.Image`) without building it."""
        return cls(tuple(_commands(image)), frozenset(_raw(image)._added_python_source_set))

    def env(self) -> dict[str, str]:
        """The `ENV` variables a container of this image starts with."""
        env = {"PATH": CONTAINER_PATH}
        for line in self.commands:
            if line.startswith("ENV "):
                key, _, value = line[4:].partition("=")
                env[key.strip()] = value
        return env

    def pip_installs(self) -> list[list[str]]:
        """The arguments of each `pip install` line, in build order."""
        runs = [shlex.split(line[4:]) for line in self.commands if line.startswith("RUN ")]
        return [args[args.index("install") + 1 :] for args in runs if "install" in args]

    def packages(self) -> set[str]:
        """Distribution names the image pip-installs (pins and extras dropped, lower case)."""
        names = set()
        for args in self.pip_installs():
            for arg in args:
                if not arg.startswith("-") and not arg.startswith("http"):
                    names.add(re.split(r"[=<>!~\[; ]", arg, maxsplit=1)[0].lower())
        return names

    def base_cuda_major(self) -> int | None:
        """The CUDA toolkit major of an `nvidia/cuda:X.Y.Z-...` base image, if that is the base."""
        for line in self.commands:
            match = re.match(r"FROM nvidia/cuda:(\d+)\.", line)
            if match:
                return int(match.group(1))
        return None

    def torch_cuda_major(self) -> int | None:
        """The CUDA major of the torch build the image installs (its `.../whl/cuXYZ` index)."""
        for args in self.pip_installs():
            if any(a.startswith("torch==") for a in args):
                index = " ".join(args)
                match = re.search(r"/whl/cu(\d+)(\d)\b", index)
                return int(match.group(1)) if match else None
        return None

    def env_before(self, package: str) -> dict[str, str]:
        """The `ENV` variables set by the layers before the one that installs `package`."""
        env: dict[str, str] = {}
        for line in self.commands:
            if line.startswith("RUN ") and re.search(rf"\b{re.escape(package)}\b", line):
                return env
            if line.startswith("ENV "):
                key, _, value = line[4:].partition("=")
                env[key.strip()] = value
        raise KeyError(f"no layer installs {package}")

    def check_builds(self) -> None:
        """Refuse what cannot build: flash-attn compiled against a torch of another CUDA major
        than the base image's toolkit (torch's cpp_extension stops on the mismatch), or without
        `MAX_JOBS` in its build environment (nvcc then runs one job per core and runs out of
        memory)."""
        if "flash-attn" not in self.packages():
            return
        toolkit, torch_cuda = self.base_cuda_major(), self.torch_cuda_major()
        if toolkit is None or toolkit != torch_cuda:
            raise ImageBuildError(
                f"flash-attn build: torch is built for CUDA {torch_cuda} but the base image's "
                f"toolkit is CUDA {toolkit}"
            )
        if "MAX_JOBS" not in self.env_before("flash-attn"):
            raise ImageBuildError("flash-attn build: MAX_JOBS is not set before its layer")


# Modal mounts its client (the `modal` package and the requirements of the image builder
# version) into every container (modal/builder/2025.06.txt; modal/_image.py), whatever the
# image installs.
CLIENT_REQUIREMENTS = Path(importlib.util.find_spec("modal").origin or "").parent / "builder"


def _client_packages() -> set[str]:
    lines = (CLIENT_REQUIREMENTS / f"{BUILDER_VERSION}.txt").read_text().splitlines()
    return {"modal"} | {Requirement(line).name for line in lines if line.strip()}


def _closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require, transitively, as installed here (pip
    resolves the same dependencies when it builds the image; extras are not installed)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # in the image, not on this machine (flash-attn, ninja): nothing to import
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def installed_distributions(image: ImageDefinition) -> set[str]:
    """Canonical names of the distributions a container of `image` has: those it pip-installs,
    with their dependencies, and Modal's client."""
    return _closure(image.packages() | _client_packages())


def site_folder(image: ImageDefinition, root: Path) -> Path:
    """A site-packages folder holding only what `image` installs (links into this machine's).

    Containers run this machine's interpreter with it instead of the test environment's
    site-packages, so a module the image lacks is absent, as on Modal: importing it raises
    `ModuleNotFoundError` and `importlib.util.find_spec` returns None. Built once per image.
    """
    wanted = installed_distributions(image)
    key = hashlib.sha256("\n".join(sorted(wanted)).encode()).hexdigest()[:16]
    folder = root / f"site-{key}"
    if folder.is_dir():
        return folder
    staging = root / f".site-{key}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in wanted:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or () if ".." not in str(f)}:
            link = staging / top
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(top))))
    try:
        staging.rename(folder)
    except OSError:  # another container built it meanwhile
        shutil.rmtree(staging)
    return folder
