"""TensorBoard for every run's training, served from the data volume as a Modal web endpoint.

    modal deploy modal_jobs/tensorboard_app.py   # prints the endpoint's URL
    modal serve modal_jobs/tensorboard_app.py    # temporary URL while the command runs

Locally the same event files are under `MOLE_HOME/volumes/moe-lora-data/runs/`: `make tensorboard`.
"""

from __future__ import annotations

import threading
from typing import Any

import modal

from modal_jobs.launch import compute
from modal_jobs.layout import DATA_VOLUME, Volumes
from modal_jobs.mole_app import cpu_image

# This file imports `modal_jobs` (and so pydantic, yaml): the board runs on the stages' CPU
# image, which has those packages, tensorboard and the project source. Training containers
# commit event files as they go; a running board reloads the volume and rescans this often (the
# container imports this file again: the interval travels in the image).
RELOAD_EVERY_S = compute.web_reload_s()
image = cpu_image.env({compute.WEB_RELOAD_ENV: str(RELOAD_EVERY_S)})
data_volume = modal.Volume.from_name(DATA_VOLUME, create_if_missing=True)
RUNS = Volumes.modal().runs  # each run's events: runs/<run>/tensorboard/
BOARD = compute.functions()["tensorboard"]

app = modal.App(f"{compute.APP_NAME}-tensorboard")


def _reload_periodically() -> None:
    while True:
        threading.Event().wait(RELOAD_EVERY_S)
        try:
            data_volume.reload()
        except RuntimeError:  # open event files block a reload; the next round retries
            continue


@app.function(
    image=image,
    cpu=BOARD.cpu,
    memory=BOARD.memory_mib,
    timeout=BOARD.timeout_s,
    volumes={mount: data_volume for mount in BOARD.mounts().values()},
    scaledown_window=15 * compute.MINUTE,
)
@modal.concurrent(max_inputs=100)
@modal.wsgi_app()
def tensorboard() -> Any:
    """TensorBoard over `/vol/moe-lora-data/runs` (runs appear as `<run>/tensorboard`)."""
    from tensorboard import program
    from tensorboard.backend import application

    if RELOAD_EVERY_S > 0:  # 0: the runs committed before the board started, loaded once
        threading.Thread(target=_reload_periodically, daemon=True).start()
    board = program.TensorBoard()
    board.configure(logdir=str(RUNS), reload_interval=RELOAD_EVERY_S)
    provider, multiplexer = board._make_data_provider()  # what `tensorboard --logdir` serves
    return application.TensorBoardWSGIApp(
        board.flags, board.plugin_loaders, provider, board.assets_zip_provider, multiplexer
    )


@app.local_entrypoint()
def main() -> None:
    """`modal run` prints where to look; the endpoint itself needs `modal serve` or `deploy`."""
    print(f"TensorBoard reads {DATA_VOLUME}:/runs; `modal serve {compute.TENSORBOARD_APP_FILE}`")
