"""The span export process, against the tests' OTLP/HTTP receiver: rows become spans there, a
line that is not rows is skipped, a killed process is replaced, a full buffer drops and counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import pytest

from local_inference_pool.gateway.span_export import Row, SpanExportProcess

from ..otlp import Receiver, receiver

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _export_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's batch processor in the export process exports every 0.1 s, not every 5 s."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _row(name: str, span_id: int, parent_id: int = 0) -> Row:
    attributes = {"lip.backend": "gpu", "gen_ai.response.finish_reasons": ["stop"], "lip.attempt": 1}
    return [name, 1, TRACE_ID, span_id, parent_id, True, "", 1_000, 2_000, 0, "", attributes]


async def _until_spans(found: Receiver, count: int) -> None:
    with anyio.fail_after(15):
        while len(found.spans) < count:
            await anyio.sleep(0.05)


async def test_rows_become_spans_with_their_parents_and_attributes() -> None:
    async with receiver() as found:
        export = SpanExportProcess(found.url, "pool-test")
        async with export.running():
            export.put([_row("chat m", 0xA1, parent_id=0xB2), _row("POST gpu", 0xA2, parent_id=0xA1)])
            await _until_spans(found, 2)
    spans = {span.name: span for span in found.spans}
    root, attempt = spans["chat m"], spans["POST gpu"]
    assert (root.name, root.trace_id, root.span_id, root.parent_id) == (
        "chat m",
        f"{TRACE_ID:032x}",
        f"{0xA1:016x}",
        f"{0xB2:016x}",
    )
    assert root.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attempt.parent_id == root.span_id
    assert export.dropped == 0


async def test_what_is_left_is_exported_as_it_stops() -> None:
    async with receiver() as found:
        export = SpanExportProcess(found.url, "pool-test")
        async with export.running():
            export.put([_row(f"span {n}", n + 1) for n in range(300)])
        assert len(found.spans) == 300  # written, and exported by the process before it ended
        assert export.pid is None


async def test_a_killed_export_process_is_replaced_and_the_later_spans_arrive() -> None:
    async with receiver() as found:
        export = SpanExportProcess(found.url, "pool-test")
        async with export.running():
            export.put([_row("before", 1)])
            await _until_spans(found, 1)
            pid = export.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(15):  # the pause after a death is 1 s at first
                while export.pid in (None, pid):
                    export.put([_row("after", 2)])
                    await anyio.sleep(0.1)
            await _until_spans(found, 2)
    assert "after" in {span.name for span in found.spans}


async def test_the_export_process_outlives_a_ctrl_c_and_stops_when_its_stdin_closes() -> None:
    async with receiver() as found:
        export = SpanExportProcess(found.url, "pool-test")
        async with export.running():
            export.put([_row("before", 1)])
            await _until_spans(found, 1)  # the process is up, its signals set
            pid = export.pid
            assert pid is not None
            os.kill(pid, signal.SIGINT)  # as a terminal sends it to the whole process group
            os.kill(pid, signal.SIGTERM)
            export.put([_row("after the signals", 2)])
        assert [span.name for span in found.spans] == ["before", "after the signals"]
        assert export.dropped == 0


async def test_a_full_buffer_drops_and_counts() -> None:
    export = SpanExportProcess("http://127.0.0.1:9/v1/traces", "pool-test", max_pending=2)
    for n in range(5):
        export.put([_row("span", n + 1)])
    assert export.dropped == 3


async def test_the_export_process_skips_a_line_that_is_not_rows() -> None:
    async with receiver() as found:
        settings = f'{{"endpoint": "{found.url}", "service_name": "pool-test"}}\n'
        lines = [settings, "not json\n", '[["too", "short"]]\n', '{"a": 1}\n', f"[{_row('kept', 7)}]\n"]
        text = "".join(lines).replace("'", '"').replace("True", "true")
        command = [sys.executable, "-c", "from local_inference_pool.gateway.span_export import main; main()"]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                command, input=text, capture_output=True, text=True, timeout=30, check=False
            )
        )
    assert done.returncode == 0
    assert [span.name for span in found.spans] == ["kept"]
    assert done.stderr.count("a line was not spans") == 3
