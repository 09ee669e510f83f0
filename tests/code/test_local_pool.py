"""The local engine spreads trials over processes when that pays: the same results to the bit, the
first error raised as the loop would raise it, and the stage's own process alone when it does not pay."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from mmfusion import compute
from mmfusion.config import parse_params
from tests.code.synthetic import write_synthetic_features


def pid_after(item: float) -> int:
    time.sleep(item)
    return os.getpid()


def fails_on_three(item: int) -> int:
    if item == 3:
        raise ValueError(f"item {item} is bad")
    time.sleep(0.05)
    return item


def exits_in_a_pool(item: int, parent: int) -> int:
    if os.getpid() != parent:
        os._exit(3)  # a worker that dies (killed, out of memory)
    return item * 10


def test_the_pool_runs_only_when_it_pays():
    assert not compute.pool_pays(0.3, 7, 2)  # a tiny dataset's CV: a pool's start costs more than it saves
    assert compute.pool_pays(3.0, 43, 2)  # CV on the emoji data: 3 s trials
    assert not compute.pool_pays(30.0, 1, 2) and not compute.pool_pays(30.0, 10, 1)


def test_items_spread_over_processes_and_errors_surface(monkeypatch):
    monkeypatch.setattr(compute, "POOL_START_S", 0.0)
    c = parse_params({"compute": {"local_processes": 2}}).compute
    pids = compute.map_tasks(pid_after, [0.01, 0.01, 0.3, 0.3, 0.3], c, "probe")
    assert pids[:2] == [os.getpid()] * 2 and os.getpid() not in pids[2:]  # the first two time the rest here
    with pytest.raises(ValueError, match="item 3 is bad"):
        compute.map_tasks(fails_on_three, [0, 1, 2, 3, 4, 5], c, "probe")
    # a pool whose workers die: the remaining items run here, and the results are whole
    assert compute.map_tasks(exits_in_a_pool, [0, 1, 2, 3, 4], c, "probe", parent=os.getpid()) == [0, 10, 20, 30, 40]
    alone = parse_params({"compute": {"local_processes": 1}}).compute
    assert set(compute.map_tasks(pid_after, [0.01, 0.01, 0.01], alone, "probe")) == {os.getpid()}


def test_cv_trials_over_processes_equal_the_loop_to_the_bit(tmp_path, monkeypatch):
    from mmfusion.training.crossval import cross_validate, make_folds
    from mmfusion.training.data import load_split

    labels = [f"class_{i}" for i in range(4)]
    write_synthetic_features(tmp_path / "features", per_class={"train": 6, "val": 3, "test": 3, "augmented": 0})
    data = load_split(tmp_path / "features", "train", labels).concat(load_split(tmp_path / "features", "val", labels))
    folds = make_folds(data, 3, seed=0)
    encoders = json.loads((tmp_path / "features" / "meta.json").read_text())["modalities"]
    sections = {"train": {"hidden_dim": 8, "epochs": 3, "patience": 3, "batch_size": 16, "cpu_threads": 1}}
    threads = torch.get_num_threads()
    loop = cross_validate(["image_only", "concat"], data, folds, labels, encoders,
                          parse_params({**sections, "compute": {"local_processes": 1}}), "macro_f1")  # fmt: skip
    monkeypatch.setattr(compute, "POOL_START_S", 0.0)
    spread = cross_validate(["image_only", "concat"], data, folds, labels, encoders,
                            parse_params({**sections, "compute": {"local_processes": 2}}), "macro_f1")  # fmt: skip
    torch.set_num_threads(threads)
    for a, b in zip(loop, spread):
        assert a.name == b.name and np.array_equal(a.oof_logits, b.oof_logits)
        assert a.fold_scores == b.fold_scores and a.best_epochs == b.best_epochs
        for x, y in zip(a.heads, b.heads):
            assert all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())
