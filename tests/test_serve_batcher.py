"""The server's batcher on its own (no HTTP): which requests share a forward pass."""

import asyncio
import time

import pytest

pytest.importorskip("fastapi")

from deltatune.serve.app import Batcher  # noqa: E402
from deltatune.serve.settings import ServeSettings  # noqa: E402


class RecordingEngine:
    """Answers every row after `seconds`, recording the batches it was given."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.batches = seconds, []

    def predict(self, rows, task, batch_size, precision):
        self.batches.append([row[0] for row in rows])
        time.sleep(self.seconds)
        return [{"task": name, "label": "x"} for name in task]


def closed_loop_batches(engine, first_fails: bool = False) -> list[list[str]]:
    """r1 alone, then r2 queued during r1's 300 ms forward, then r3 sent by r1's client once r1 is answered
    (with an error when `first_fails`); the batches the engine was given."""

    async def scenario():
        batcher = Batcher(engine, ServeSettings(max_batch_size=4, batch_wait_ms=150))
        batcher.start()

        async def first_client():
            if first_fails:
                with pytest.raises(RuntimeError, match="the model failed"):
                    await batcher.submit([("r1",)], ["t"])
            else:
                await batcher.submit([("r1",)], ["t"])
            await batcher.submit([("r3",)], ["t"])

        async def second_client():
            await asyncio.sleep(0.2)  # r1 waits 150 ms for company, then its forward runs for 300 ms
            await batcher.submit([("r2",)], ["t"])

        await asyncio.gather(first_client(), second_client())
        await batcher.stop()

    asyncio.run(scenario())
    return engine.batches


def test_requests_queued_during_a_forward_wait_for_those_its_answers_bring_back():
    # r2 has waited longer than batch_wait_ms by the time r3 comes, but the window counts from the end of
    # r1's forward, so r2 and r3 share one
    assert closed_loop_batches(RecordingEngine(0.3)) == [["r1"], ["r2", "r3"]]


def test_a_lone_request_waits_no_longer_than_batch_wait_ms():
    engine = RecordingEngine(0.0)

    async def scenario():
        batcher = Batcher(engine, ServeSettings(batch_wait_ms=50))
        batcher.start()
        started = time.perf_counter()
        await batcher.submit([("a",)], ["t"])
        waited = time.perf_counter() - started
        await batcher.stop()
        return waited

    waited = asyncio.run(scenario())
    assert 0.04 <= waited < 0.5 and engine.batches == [["a"]]


class FailingEngine(RecordingEngine):
    """Fails its first batch after `seconds`, then answers like `RecordingEngine`."""

    def predict(self, rows, task, batch_size, precision):
        if not self.batches:
            self.batches.append([row[0] for row in rows])
            time.sleep(self.seconds)
            raise RuntimeError("the model failed")
        return super().predict(rows, task, batch_size, precision)


def test_a_failed_forward_answers_its_requests_and_counts_as_the_model_busy():
    # as above, but r1's forward fails: r1 gets the error, and r2 (queued during it) still waits
    # batch_wait_ms from the end of that forward, so it shares a batch with r3
    assert closed_loop_batches(FailingEngine(0.3), first_fails=True) == [["r1"], ["r2", "r3"]]
