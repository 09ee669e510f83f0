"""An in-process adaptive batcher: concurrent requests share one model call, no extra process, no waiting.

`MicroBatcher(fn, max_batch_size)` runs `fn(list_of_items) -> list_of_results` on one dedicated
thread, one call at a time (the model gets every core it is given and is never run twice at
once). Items submitted while a call runs queue up; when it ends, the next call takes all that
queued (up to `max_batch_size`). So a lone request goes through alone at once (no batching
delay), and under load the batch grows with the queue: adaptive batching without a timer.

- `max_batch_size=1` turns batching off (items still run one at a time on the model thread).
- An item that has waited longer than `max_latency_ms` before its call starts is answered
  `Overloaded` (the service turns it into a 503), like BentoML's own batching SLA.
- When a batched call raises, its items are retried one by one, so one bad item fails only
  its own request, never the requests it happened to share a batch with.
- `call(fn, *args)` runs other model work (an explanation's perturbed calls) on the same thread,
  between batched calls, so nothing ever runs the model beside a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing as t
from collections import deque
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The item waited in the queue longer than the latency limit; nothing was computed for it."""


class MicroBatcher:
    def __init__(self, fn: t.Callable[[list], list], max_batch_size: int = 32, max_latency_ms: float | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = max_latency_ms / 1000 if max_latency_ms else None
        self._pending: deque[tuple[t.Any, asyncio.Future, float]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._drainer: asyncio.Task | None = None
        self.calls = 0  # model calls made
        self.items = 0  # items through them
        self.busy_s = 0.0  # wall time spent in model calls

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            "items": self.items,
            "mean_batch": round(self.items / self.calls, 2) if self.calls else None,
            "busy_s": round(self.busy_s, 2),
            "queued": len(self._pending),
        }

    async def submit(self, items: t.Sequence) -> list:
        """Results for `items` (in order), computed in the model calls they are batched into."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in items]
        self._pending.extend((item, fut, now) for item, fut in zip(items, futures))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def run_sync(self, items: list) -> list:
        """One direct call on the model thread (warm-up, tests); bypasses the queue."""
        return self._executor.submit(self._fn, items).result()

    async def call(self, fn: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        """`fn(*args)` on the model thread, between batched calls (never beside one): other work that runs the
        model, as an explanation's perturbed calls. Not batched and not queued behind the latency limit; its time
        counts in `busy_s`, not in `calls`."""

        def timed() -> tuple[t.Any, BaseException | None, float]:
            t0 = time.perf_counter()
            try:
                return fn(*args), None, time.perf_counter() - t0
            except Exception as exc:
                return None, exc, time.perf_counter() - t0

        # timed on the model thread (waiting for it is not busy time), added on the loop's thread (busy_s's writer)
        result, exc, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        self.busy_s += seconds
        if exc is not None:
            raise exc
        return result

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = []
            now = time.monotonic()
            while self._pending and len(batch) < self.max_batch_size:
                item, fut, queued = self._pending.popleft()
                if fut.done():  # the request was cancelled (client gone)
                    continue
                if self.max_wait_s is not None and now - queued > self.max_wait_s:
                    fut.set_exception(Overloaded(f"waited {now - queued:.1f} s for the model, over the limit"))
                    continue
                batch.append((item, fut))
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"model returned {len(results)} results for {len(batch)} items")
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc=exc)
                    continue
                log.warning("batched model call of %d items failed (%s); retrying them one by one", len(batch), exc)
                for item, fut in batch:
                    try:
                        (result,) = await loop.run_in_executor(self._executor, self._fn, [item])
                    except Exception as one_exc:
                        _settle(fut, exc=one_exc)
                    else:
                        _settle(fut, result)
                continue
            finally:
                self.busy_s += time.perf_counter() - t0
            self.calls += 1
            self.items += len(batch)
            for (_, fut), result in zip(batch, results):
                _settle(fut, result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(fut: asyncio.Future, result: t.Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
