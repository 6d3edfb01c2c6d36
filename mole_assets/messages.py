"""Reading a stage's Pipes messages whole: dagster's file reader can parse half a message.

`dagster.PipesFileMessageReader` tails the message file with `dagster._utils.tail_file`, which
hands a line to `json.loads` as soon as `readline()` returns it; at the end of the file that is
the first part of a message the stage is still writing. Large messages are written in several
chunks (the eval report's materialization, with its predictions table, is over 100 KB), so the
reader sometimes fails with a `JSONDecodeError` and the rest of the run's messages (the asset
checks among them) are lost. This reader waits for the newline that ends every message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from threading import Event
from typing import Any

import dagster as dg


def whole_lines(path: str, should_stop: Callable[[], bool]) -> Iterator[str]:
    """The lines of a growing file, each once it is complete, until `should_stop` and EOF.

    A last line without its newline when the writer is done is yielded as it is (it is torn,
    and parsing it reports the fault).
    """
    with open(path, encoding="utf-8") as stream:
        partial = ""
        while True:
            partial += stream.readline()
            if partial.endswith("\n"):
                yield partial
                partial = ""
            elif not should_stop():
                time.sleep(0.01)  # nothing new yet, or half a line: the writer is still at it
            else:  # the writer is done: the rest of the file is all there is
                yield from (partial + stream.read()).splitlines(keepends=True)
                return


class WholeLineFileReader(dg.PipesFileMessageReader):
    """`PipesFileMessageReader` that parses each message only once its line is complete."""

    def _reader_thread(self, handler: Any, is_resource_complete: Event) -> None:
        try:
            for line in whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except BaseException:
            handler.report_pipes_framework_exception(
                f"{type(self).__name__} reader thread", sys.exc_info()
            )
            raise


class WholeLineTempFileReader(dg.PipesTempFileMessageReader):
    """`PipesTempFileMessageReader` (the subprocess clients' default) reading whole lines."""

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[dg.PipesParams]:
        """Tail a message file in a new temporary folder, as the default reader does."""
        with tempfile.TemporaryDirectory() as folder:
            reader = WholeLineFileReader(
                os.path.join(folder, "messages"),
                include_stdio_in_messages=self._include_stdio_in_messages,
            )
            with reader.read_messages(handler) as params:
                yield params
