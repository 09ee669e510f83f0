"""Where the work runs: in the stage's own process (`compute.engine: local`) or on a Dask cluster
through Prefect's own integration (`engine: dask`, prefect-dask's DaskTaskRunner).

Stages stay engine-agnostic: they hand a function and its items to `map_tasks`, which runs them
in-process on the local engine (exactly as a plain loop) or as mapped Prefect tasks on the
cluster. Inside a stage flow whose task runner is already the Dask one (flows/stages.py builds it
from `build_task_runner`), the tasks go to that runner; a stage called directly
(`stage.run(params, root)`) with `engine: dask` runs them in a small flow of its own.

The cluster is an existing scheduler (`compute.address`, or the MMFUSION_DASK_ADDRESS environment
variable, which wins) or a temporary LocalCluster of `compute.cluster` for one flow run.

On the local engine without a GPU, `map_tasks` runs the first two items in the stage's process and times
the second; when the rest would take longer one after the other than spread over `compute.local_processes`
processes (one per core by default) plus a pool's start, they run in that many spawned processes
(`concurrent.futures`, one task at a time each). CPU trials run single-threaded (train.cpu_threads),
so the results are the same to the bit either way (tested).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from mmfusion.config import ComputeParams
from mmfusion.errors import UserError

log = logging.getLogger(__name__)

ENGINES = ("local", "dask")
ADDRESS_ENV = "MMFUSION_DASK_ADDRESS"
# What starting a local process pool costs before its first result: spawned workers import torch and
# mmfusion (and the stage's flows module, as __mp_main__) and receive the fixed arguments (measured:
# 3.8-4.1 s to the first results of 2 processes on 2 cores, before the flows module).
POOL_START_S = 6.0


class TasksFailedError(RuntimeError):
    """Some mapped tasks failed; every other task ran to its end. `failures` and `results` are by item index."""

    def __init__(self, name: str, results: dict[int, Any], failures: dict[int, BaseException]):
        self.name, self.results, self.failures = name, results, failures
        first = next(iter(failures.values()))
        super().__init__(
            f"{len(failures)} of {len(results) + len(failures)} {name} task(s) failed "
            f"(items {sorted(failures)}); first: {type(first).__name__}: {first}"
        )


def check_compute(c: ComputeParams) -> None:
    """Fail before any work on compute params that cannot run."""
    if c.engine not in ENGINES:
        raise UserError(f"compute.engine must be one of {', '.join(ENGINES)}, got {c.engine!r}")
    if c.cluster.workers < 0 or c.cluster.threads_per_worker < 1 or c.shard_size < 1:
        raise UserError("compute.cluster.workers must be >= 0 (0 = auto), threads_per_worker and shard_size >= 1")
    if c.local_processes < 0:
        raise UserError("compute.local_processes must be >= 0 (0 = one per core, 1 = none: all in the stage's process)")


def scheduler_address(c: ComputeParams) -> str:
    """The existing scheduler to use ('' = a temporary LocalCluster); the environment variable wins."""
    return os.environ.get(ADDRESS_ENV, "").strip() or c.address.strip()


def local_cluster_kwargs(c: ComputeParams) -> dict[str, Any]:
    """LocalCluster arguments: `workers: 0` is one worker per visible GPU (else 2); no dashboard (offline, no port)."""
    workers = c.cluster.workers or max(gpu_count(), 1) * (1 if gpu_count() else 2)
    return {
        "n_workers": workers,
        "threads_per_worker": c.cluster.threads_per_worker,
        "processes": c.cluster.processes,
        "dashboard_address": None,
        # Workers report their task runs to this process's Prefect API; without it each worker process
        # would start an ephemeral server of its own (seconds each, and runs missing from the UI).
        "env": {"PREFECT_API_URL": prefect_api_url()},
    }


def prefect_api_url() -> str:
    """The Prefect API this process reports to: PREFECT_API_URL, else its ephemeral server (started now, the
    same one every flow run of this process uses)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return 0


def build_task_runner(c: ComputeParams):
    """The Prefect task runner for `c`: None on the local engine (Prefect's default), else a DaskTaskRunner."""
    check_compute(c)
    if c.engine == "local":
        return None
    from prefect_dask import DaskTaskRunner

    address = scheduler_address(c)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(c))


def worker_device(device: str) -> str:
    """On a Dask worker of a multi-GPU machine, `auto`/`cuda` becomes this worker's own GPU (worker name i ->
    cuda:i mod GPUs): one worker per GPU. Workers started one per GPU with CUDA_VISIBLE_DEVICES see one GPU."""
    if device not in ("auto", "cuda") or gpu_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a worker
        return device
    return f"cuda:{int(name) % gpu_count()}" if str(name).isdigit() else device


def worker_name() -> str:
    """The Dask worker this runs on ('local' outside a worker)."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "local"


def _gather(futures: Sequence[Any], name: str) -> list[Any]:
    """Results in item order once every future has finished; failed items raise TasksFailedError at the end."""
    results: dict[int, Any] = {}
    failures: dict[int, BaseException] = {}
    for i, future in enumerate(futures):
        future.wait()
        state = future.state
        if state.is_completed():
            results[i] = future.result()
        else:
            error = state.result(raise_on_failure=False)
            if not isinstance(error, BaseException):  # crashed or cancelled: no exception, only the state
                error = RuntimeError(f"{state.type.value}: {state.message}")
            failures[i] = error
    if failures:
        raise TasksFailedError(name, results, failures)
    return [results[i] for i in range(len(futures))]


def map_tasks(
    fn: Callable[..., Any],
    items: Sequence[Any],
    compute: ComputeParams,
    name: str,
    progress: str = "",
    **fixed: Any,
) -> list[Any]:
    """`[fn(item, **fixed) for item in items]`, on the engine `compute` names.

    local: that loop (an error stops it at once), with a progress bar labelled `progress` when one is
    given; in this process, or after the first two items in `compute.local_processes` processes when
    that pays (the module docstring). dask: one Prefect task per item on the cluster (the Prefect UI
    shows them); every task runs to its end, then a TasksFailedError carries the failures and the
    other results. `fn` must be importable on the workers (a module-level function of mmfusion).
    """
    check_compute(compute)
    if compute.engine == "local" or not items:
        return _map_local(fn, list(items), compute, progress, fixed)
    from prefect import flow, task, unmapped
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    mapped = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False, retries=0)
    kwargs = {k: unmapped(v) for k, v in fixed.items()}

    def run_mapped() -> list[Any]:
        return _gather(mapped.map(list(items), **kwargs), name)

    context = FlowRunContext.get()
    if context is not None and isinstance(context.task_runner, DaskTaskRunner):
        return run_mapped()
    return flow(name=f"{name}-map", task_runner=build_task_runner(compute), persist_result=False)(run_mapped)()


def local_processes(c: ComputeParams) -> int:
    """Processes the local engine may spread items over: `compute.local_processes`, 0 = one per core."""
    if c.local_processes:
        return c.local_processes
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pool_pays(item_s: float, rest: int, processes: int) -> bool:
    """True when `rest` items of `item_s` seconds each finish sooner over `processes` processes, after
    the pool's start, than one after the other here."""
    if processes < 2 or rest < 2:
        return False
    return item_s * rest > POOL_START_S + item_s * -(-rest // processes)


def _map_local(fn: Callable[..., Any], items: list[Any], compute: ComputeParams, progress: str, fixed: dict[str, Any]) -> list[Any]:
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=progress, unit="task", dynamic_ncols=True, disable=not progress or len(items) < 2) as bar:
        if not items:
            return []
        # The first two here: the first carries one-time costs (lazy imports, first kernels), so the second's
        # time is the estimate per item (measured: 4.6 s then 3.4 s on emoji CV; a tiny test dataset's strategies 1.9 s then 0.3 s).
        results, seconds = [], 0.0
        for item in items[:2]:
            start = time.perf_counter()
            results.append(fn(item, **fixed))
            seconds = time.perf_counter() - start
            bar.update()
        rest = items[2:]
        # a pool's worker never starts a pool of its own
        processes = 1 if _POOL_CALL is not None else min(local_processes(compute), len(rest))
        if gpu_count() or not pool_pays(seconds, len(rest), processes):
            for item in rest:
                results.append(fn(item, **fixed))
                bar.update()
            return results
        log.info("%s: %d more tasks of about %.1f s: spread over %d processes", progress or fn.__name__, len(rest), seconds, processes)
        from concurrent.futures.process import BrokenProcessPool

        try:
            return results + _map_pool(fn, rest, fixed, processes, bar)
        except BrokenProcessPool as exc:  # a worker died (killed, out of memory): the results do not depend on where
            log.warning("%s: the process pool broke (%s); the %d remaining tasks run in this process", progress or fn.__name__, exc, len(rest))
            return results + [fn(item, **fixed) for item in rest]


_POOL_CALL: tuple[Callable[..., Any], dict[str, Any]] | None = None


def _pool_init(fn: Callable[..., Any], fixed: dict[str, Any]) -> None:
    global _POOL_CALL
    _POOL_CALL = (fn, fixed)


def _pool_call(item: Any) -> Any:
    fn, fixed = _POOL_CALL
    return fn(item, **fixed)


def _map_pool(fn: Callable[..., Any], items: list[Any], fixed: dict[str, Any], processes: int, bar: Any) -> list[Any]:
    """`items` over `processes` spawned processes; the fixed arguments travel once per process. The first
    error cancels what has not started and is raised here, as the loop would raise it."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # never fork a process whose torch threads are running
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_pool_init, initargs=(fn, fixed)) as pool:
        futures = [pool.submit(_pool_call, item) for item in items]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            pool.shutdown(cancel_futures=True)
            raise failed[0].exception()
        return [f.result() for f in futures]
