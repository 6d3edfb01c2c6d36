"""A stand-in for Modal's cloud (which tests cannot reach), faithful where mole's code depends.

`Cloud(root)` is one emulated workspace: volumes with Modal's commit/reload consistency
(`volumes.py`), containers as processes in private mount namespaces (`cloud.py`, run by
`container.py`), images read from their definitions (`image.py`), and a `modal` executable
(`Cloud.shim()`, running `cli.py`) that `dagster_modal.ModalClient` finds first on PATH.
"""

from .cloud import Cloud, unavailable

__all__ = ["Cloud", "unavailable"]
