"""The service's in-process batcher (no server, no model): batching, isolation of bad items, the latency limit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mmfusion.serving.batcher import MicroBatcher, Overloaded


class Model:
    """Doubles numbers; fails a call that contains "bad"; records the size of each call and its thread."""

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.calls.append(len(items))
            self.threads.add(threading.current_thread().name)
            time.sleep(self.delay)
            if "bad" in items:
                raise ValueError("bad item")
            return [x * 2 for x in items]
        finally:
            with self._lock:
                self.running -= 1


def test_concurrent_requests_share_calls_and_keep_their_order():
    model = Model()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=4)
        singles = [batcher.submit([i]) for i in range(10)]
        return await asyncio.gather(*singles, batcher.submit([100, 101, 102, 103, 104, 105]))

    results = asyncio.run(main())
    assert results[:10] == [[2 * i] for i in range(10)]
    assert results[10] == [200, 202, 204, 206, 208, 210]
    assert sum(model.calls) == 16 and max(model.calls) == 4 and len(model.calls) == 4
    assert model.max_running == 1 and len(model.threads) == 1  # one model call at a time, on one thread


def test_a_lone_request_is_not_delayed():
    model = Model(delay=0.0)

    async def main():
        batcher = MicroBatcher(model, max_batch_size=32)
        t0 = time.perf_counter()
        result = await batcher.submit([3])
        return result, time.perf_counter() - t0

    result, elapsed = asyncio.run(main())
    assert result == [6] and model.calls == [1] and elapsed < 0.5


def test_a_bad_item_fails_only_its_own_request():
    model = Model()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=8)
        return await asyncio.gather(batcher.submit([1]), batcher.submit(["bad"]), batcher.submit([3]), return_exceptions=True)

    good1, bad, good3 = asyncio.run(main())
    assert good1 == [2] and good3 == [6]
    assert isinstance(bad, ValueError)


def test_batching_off_runs_one_item_per_call():
    model = Model(delay=0.0)

    async def main():
        batcher = MicroBatcher(model, max_batch_size=1)
        return await asyncio.gather(*(batcher.submit([i]) for i in range(5)))

    assert asyncio.run(main()) == [[0], [2], [4], [6], [8]]
    assert model.calls == [1] * 5


def test_items_over_the_latency_limit_are_refused_not_computed():
    model = Model(delay=0.1)

    async def main():
        batcher = MicroBatcher(model, max_batch_size=1, max_latency_ms=250)
        return await asyncio.gather(*(batcher.submit([i]) for i in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:2] == [[0], [2]]
    assert isinstance(results[-1], Overloaded)
    assert len(model.calls) < 6


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch_size=0)


def test_call_runs_other_model_work_on_the_model_thread_never_beside_a_batch():
    """`call` (an explanation's work) shares the model thread with the batched calls: one at a time, timed in busy_s."""
    model = Model(delay=0.05)

    def explain(items: list, scale: int) -> list:
        return [x * scale for x in model(items)]  # the model itself, as an explanation's perturbed calls run it

    async def main():
        batcher = MicroBatcher(model, max_batch_size=4)
        out = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), batcher.call(explain, [1, 2], 10),
                                   batcher.call(explain, ["bad"], 1), return_exceptions=True)  # fmt: skip
        return batcher, out

    batcher, out = asyncio.run(main())
    assert out[:6] == [[2 * i] for i in range(6)] and out[6] == [20, 40]
    assert isinstance(out[7], ValueError)  # its own exception, raised to its caller only
    assert model.max_running == 1 and len(model.threads) == 1
    assert batcher.items == 6  # the other work is not counted as batched items...
    assert batcher.busy_s >= 0.05 * len(model.calls) * 0.9  # ...but its time is busy time
