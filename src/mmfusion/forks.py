"""What a process forked from a stage's process needs: a DataLoader's image-decoding workers are forked from the
featurize (or train) process, which runs as a Prefect flow.

Prefect resets its queue services (the API log and event workers) after a fork, but their
`threading._register_atexit` hooks stay, and at the child's exit each fails on the reset state (AssertionError in
`_QueueServiceBase._drain`, prefect 3.8.8): every forked child then exits with code 1, which a DataLoader reports
as a crashed worker. The child has no threads of those services to drain, so their hooks are dropped.
tests/flows/test_stage_flows.py checks both the fix and that Prefect still needs it.
Its own module, not mmfusion.compat: the stages that fork depend on it (dvc.yaml), and a serving shim changed in
compat must not make DVC retrain.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Any


def drop_inherited_prefect_exit_hooks() -> int:
    """Drop the exit hooks of Prefect's queue services in this (forked) process; returns how many."""
    if "prefect" not in sys.modules:  # no Prefect in this process: nothing to drop, and no import of it per worker
        return 0
    try:
        base = importlib.import_module("prefect._internal.concurrency.services")._QueueServiceBase
        hooks = threading._threading_atexits  # type: ignore[attr-defined]
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"prefect or threading moved a private name mmfusion.forks uses: {exc}") from exc

    def prefect_service(hook: Any) -> bool:
        target = getattr(hook, "func", hook)  # a functools.partial of the bound method
        return isinstance(getattr(target, "__self__", None), base)

    kept = [hook for hook in hooks if not prefect_service(hook)]
    dropped = len(hooks) - len(kept)
    hooks[:] = kept
    return dropped


def dataloader_worker_init(_worker_id: int) -> None:
    """A DataLoader's `worker_init_fn`: the worker forgets the exit hooks it inherited from a stage's flow run."""
    drop_inherited_prefect_exit_hooks()
