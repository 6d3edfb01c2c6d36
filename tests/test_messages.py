"""Pipes messages are parsed whole, however slowly the stage writes a large one."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import pytest

from mole_assets.messages import WholeLineTempFileReader, whole_lines

# A stage whose message writer pauses halfway through each message, as a large message
# written in several chunks can (the real eval report's is over 100 KB).
SLOW_WRITER = """
import json, time
import dagster_pipes
from dagster_pipes import PipesFileMessageWriterChannel, open_dagster_pipes

def write_message(self, message):
    line = json.dumps(message) + "\\n"
    with open(self._path, "a", encoding="utf-8") as f:
        f.write(line[: len(line) // 2])
        f.flush()
        time.sleep(0.3)
        f.write(line[len(line) // 2 :])

PipesFileMessageWriterChannel.write_message = write_message
with open_dagster_pipes() as context:
    context.report_asset_materialization(metadata={"table": "x" * 200_000})
    context.report_asset_check("whole", passed=True)
"""


def _materialize(tmp_path: Path, reader: dg.PipesMessageReader | None) -> dg.ExecuteInProcessResult:
    script = tmp_path / "stage.py"
    script.write_text(SLOW_WRITER)

    @dg.asset(check_specs=[dg.AssetCheckSpec("whole", asset="staged")])
    def staged(context):  # type: ignore[no-untyped-def]  # dagster reads the bare name
        client = dg.PipesSubprocessClient(message_reader=reader)
        return client.run(
            command=[sys.executable, str(script)], context=context
        ).get_materialize_result()

    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        return dg.materialize([staged], instance=instance, raise_on_error=False)


def test_a_message_written_in_two_halves_is_read_whole(tmp_path: Path) -> None:
    result = _materialize(tmp_path, WholeLineTempFileReader())
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    (event,) = result.get_asset_materialization_events()
    assert len(event.materialization.metadata["table"].value) == 200_000


def test_dagsters_own_reader_loses_that_message(tmp_path: Path) -> None:
    """The fault the reader exists for: the default reader parses the first half and fails."""
    result = _materialize(tmp_path, None)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    # What CI saw on the real eval report: the check's result never arrived.
    assert "did not yield or return expected outputs" in str(failure.event_specific_data)


def test_whole_lines_keeps_a_torn_last_line_for_the_parser(tmp_path: Path) -> None:
    path = tmp_path / "messages"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c"')
    assert list(whole_lines(str(path), lambda: True)) == ['{"a": 1}\n', '{"b": 2}\n', '{"c"']
    with pytest.raises(ValueError):
        __import__("json").loads(list(whole_lines(str(path), lambda: True))[-1])
