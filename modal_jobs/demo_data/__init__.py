"""Synthetic, app-like screenshots for training and smoke-testing the mole router.

Every sample is a fake screenshot of one of six "expert" apps together with a user instruction
from that app's domain and an expert answer that talks about what is actually drawn on the
screen. ``write_demo_data`` stores them in the dataset layout used by the training jobs::

    <out>/<expert>/datasets/demo.jsonl
    <out>/<expert>/datasets/images/00000.png

One JSON object per line::

    {"id": "<expert>-<seed>-<i:05d>", "image": "images/<i:05d>.png",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Each app has a visual identity of its own (layout plus large regions in its own palette) so it
stays recognisable when the screenshot is downscaled to roughly 256x160 pixels, while window
size, palette, content, pane sizes and clutter (toasts, cursor, tooltips, desktop margins) vary.

One module per app (``calendar``, ``spreadsheet``, ``terminal``, ``email``, ``code_editor``,
``map``), the drawing helpers they share (``draw``), the whole screen around an app window
(``screen``) and the writer (``writer``). Run ``python -m modal_jobs.demo_data --out DIR
--per-expert N --seed S`` to write a data set.
"""

from modal_jobs.demo_data.screen import EXPERTS, Sample, render_sample
from modal_jobs.demo_data.writer import main, write_demo_data

__all__ = ["EXPERTS", "Sample", "main", "render_sample", "write_demo_data"]
