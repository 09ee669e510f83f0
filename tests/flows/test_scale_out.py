"""compute.engine: dask on a real Dask cluster (a LocalCluster of 2 worker processes, used as an existing
scheduler), through Prefect's DaskTaskRunner: featurize shards, training trials and the folds of
cross-validated selection give exactly the local engine's outputs, a cached rerun encodes nothing, and a
failing shard is reported with its rows while the other shards stay cached."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mmfusion.config import params_to_dict, parse_params
from mmfusion.stages import evaluate, featurize, train
from tests.code.synthetic import write_synthetic_features
from tests.code.test_featurize import write_split_fixture

# Worker processes import torch and load both encoders: about 4 min on a loaded 2-core machine.
pytestmark = pytest.mark.slow

FEATURIZE = {"device": "cpu", "num_workers": 0, "batch_size": 2, "cpu_threads": 1}  # batch 2: several shards
TRAIN = {"strategies": ["image_only", "concat", "late"], "epochs": 3, "patience": 2, "hidden_dim": 16, "cpu_threads": 1}


def file_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip
    }  # fmt: skip


def make_params(cache: Path | str, **compute):
    return parse_params({"featurize": {**FEATURIZE, "cache_dir": str(cache)}, "train": TRAIN, "compute": compute})


@pytest.fixture(scope="module")
def cluster(prefect_harness):
    """A real scheduler with 2 worker processes, reporting task runs to the test Prefect API."""
    from distributed import LocalCluster

    from mmfusion.compute import prefect_api_url

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"PREFECT_API_URL": prefect_api_url()}) as c:  # fmt: skip
        yield c.scheduler_address


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The tiny split data and what the local engine makes of it (features, its cache, the test's thread count kept)."""
    import torch

    threads = torch.get_num_threads()
    root = write_split_fixture(tmp_path_factory.mktemp("local"), per_split=3)
    summary = featurize.run(make_params(root / "cache"), root)
    torch.set_num_threads(threads)
    return {"root": root, "summary": summary, "features": file_hashes(root / "features")}


def copy_data(local: dict, dest: Path) -> Path:
    shutil.copytree(local["root"] / "data", dest / "data")
    return dest


def test_featurize_on_dask_is_byte_identical_and_a_cached_rerun_encodes_nothing(cluster, local, tmp_path):
    root = copy_data(local, tmp_path)
    # the shared cache as an fsspec URL (an object store on a real cluster)
    params = make_params(f"file://{tmp_path / 'cache'}", engine="dask", address=cluster, shard_size=4)
    summary = featurize.run(params, root)
    assert file_hashes(root / "features") == local["features"]
    for modality, stats in summary["encoders"].items():
        assert stats["encoded"] == local["summary"]["encoders"][modality]["encoded"] > 0
        assert stats["shards"] == -(-stats["encoded"] // 4) >= 3, modality  # misses in shards of 4 (2 batches)

    again = featurize.run(params, root)
    for stats in again["encoders"].values():
        assert stats["encoded"] == 0 and stats["shards"] == 0 and stats["cache_hits"] == stats["unique"]
    assert file_hashes(root / "features") == local["features"]


def test_a_failing_shard_is_reported_with_its_rows_and_the_others_stay_cached(cluster, local, tmp_path, monkeypatch):
    from mmfusion.stages.featurize import FeaturizeShardsError

    monkeypatch.setenv("MMFUSION_DASK_ADDRESS", cluster)  # the environment names the scheduler
    root = copy_data(local, tmp_path)
    described = (local["root"] / "cache").glob("*/encoder.json")
    image_ns = next(p.parent.name for p in described if "efficientnet" in p.read_text())
    key = hashlib.sha256((root / "data" / "clean" / "images" / "s4.png").read_bytes()).hexdigest()  # a val sample
    blocker = tmp_path / "cache" / image_ns / key[:2] / f"{key}.f32"
    (blocker / "in-the-way").mkdir(parents=True)  # a directory where the worker must write that entry
    params = make_params(tmp_path / "cache", engine="dask", shard_size=4)

    with pytest.raises(FeaturizeShardsError, match="image shard .*val/s4") as err:
        featurize.run(params, root)
    [shard] = err.value.shards
    assert shard["modality"] == "image" and "val/s4" in shard["rows"] and len(shard["rows"]) == 4
    assert "Is a directory" in shard["error"] or "IsADirectoryError" in shard["error"]
    images = local["summary"]["encoders"]["image"]["unique"]
    cached = len(list((tmp_path / "cache" / image_ns).glob("*/*.f32"))) - 1  # less the blocker
    assert images - 4 <= cached < images  # every other shard kept
    text_ns = next(p.parent for p in (tmp_path / "cache").glob("*/encoder.json") if "minilm" in p.read_text())
    assert len(list(text_ns.glob("*/*.f32"))) == local["summary"]["encoders"]["text"]["unique"]  # text went on

    shutil.rmtree(blocker)
    rerun = featurize.run(params, root)
    assert 1 <= rerun["encoders"]["image"]["encoded"] == images - cached <= 4  # only the failed shard
    assert rerun["encoders"]["text"]["encoded"] == 0
    assert file_hashes(root / "features") == local["features"]


def test_training_trials_on_dask_through_the_stage_flow_match_the_local_engine(cluster, local, tmp_path, monkeypatch):
    from flows.stages import build_stage_flow

    roots = {}
    for engine in ("local", "dask"):
        roots[engine] = tmp_path / engine
        shutil.copytree(local["root"] / "features", roots[engine] / "features")
    train.run(make_params(tmp_path / "cache"), roots["local"])
    monkeypatch.setenv("MMFUSION_DASK_ADDRESS", cluster)
    params = make_params(tmp_path / "cache", engine="dask")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
    stage_flow = build_stage_flow("train", params.compute)  # its task runner: the cluster's
    summary = stage_flow(params_path=str(tmp_path / "params.yaml"), root=str(roots["dask"]))

    reports = {e: json.loads((r / "reports" / "train.json").read_text()) for e, r in roots.items()}
    for name in TRAIN["strategies"]:
        for key in ("best_epoch", "epochs_run", "val_macro_f1", "parameters"):
            assert summary["strategies"][name][key] == reports["local"]["strategies"][name][key], (name, key)
    weights = {e: file_hashes(r / "models" / "strategies", skip=("curves.png",)) for e, r in roots.items()}
    assert len(weights["local"]) >= 3 * len(TRAIN["strategies"]) and weights["dask"] == weights["local"]


def test_cv_folds_on_dask_through_the_evaluate_flow_match_the_local_engine(cluster, tmp_path, monkeypatch):
    """Each (strategy, fold) trial is a task run of the evaluate flow; OOF logits, fold scores, fold heads and
    the winner are the local engine's, to the bit."""
    import numpy as np
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect_dask import DaskTaskRunner

    from flows.stages import build_stage_flow
    from mmfusion.training.crossval import cross_validate, make_folds
    from mmfusion.training.data import load_split

    labels = [f"class_{i}" for i in range(4)]
    strategies = ["image_only", "late_stacking", "ensemble"]
    sections = {"train": {"strategies": strategies, "hidden_dim": 8, "epochs": 3, "patience": 3, "batch_size": 16,
                          "cpu_threads": 1},
                "evaluate": {"raw_check": 0, "explain_rows": 0, "faithfulness_rows": 0, "bootstrap": 20, "cv_folds": 3,
                             "selection": "cv"}}  # fmt: skip
    local_params = parse_params(sections)
    monkeypatch.setenv("MMFUSION_DASK_ADDRESS", cluster)
    dask_params = parse_params({**sections, "compute": {"engine": "dask"}})
    roots = {e: tmp_path / e for e in ("local", "dask")}
    write_synthetic_features(roots["local"] / "features", per_class={"train": 6, "val": 3, "test": 3, "augmented": 0})
    threads = torch.get_num_threads()
    train.run(local_params, roots["local"])
    shutil.copytree(roots["local"], roots["dask"])
    evaluate.run(local_params, roots["local"])
    torch.set_num_threads(threads)

    # the fold trials themselves, on each engine
    data = load_split(roots["local"] / "features", "train", labels).concat(
        load_split(roots["local"] / "features", "val", labels))
    folds = make_folds(data, 3, seed=0)
    encoders = json.loads((roots["local"] / "features" / "meta.json").read_text())["modalities"]
    results = {e: cross_validate(strategies[:2], data, folds, labels, encoders, p, "macro_f1")
               for e, p in (("local", local_params), ("dask", dask_params))}  # fmt: skip
    for here, there in zip(results["local"], results["dask"]):
        assert here.name == there.name and np.array_equal(here.oof_logits, there.oof_logits)
        assert here.fold_scores == there.fold_scores and here.best_epochs == there.best_epochs
        for a, b in zip(here.heads, there.heads):
            assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    # the evaluate stage flow: its task runner is the cluster's, one task run per strategy and fold
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(dask_params)))
    stage_flow = build_stage_flow("evaluate", dask_params.compute)
    assert isinstance(stage_flow.task_runner, DaskTaskRunner)
    state = stage_flow(params_path=str(tmp_path / "params.yaml"), root=str(roots["dask"]), return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=this_run)
    assert sum(r.name.startswith("cv-fold") for r in runs) == 2 * 3  # the trained strategies x folds
    metrics = {e: json.loads((r / "reports/evaluate/metrics.json").read_text()) for e, r in roots.items()}
    for key in ("winner", "selection", "strategies", "winner_vs_best_unimodal"):
        assert metrics["dask"][key] == metrics["local"][key], key
    assert metrics["dask"]["selection"] == "cv" and set(metrics["dask"]["strategies"]) == set(strategies)
    best = {e: file_hashes(r / "models" / "best") for e, r in roots.items()}
    assert best["dask"] == best["local"] and any(k.endswith(".safetensors") or k.endswith(".pt") for k in best["local"])


def test_task_runner_from_params():
    from prefect_dask import DaskTaskRunner

    from mmfusion.compute import build_task_runner
    from mmfusion.errors import UserError

    assert build_task_runner(parse_params({}).compute) is None  # local: Prefect's default runner
    runner = build_task_runner(parse_params({"compute": {"engine": "dask", "cluster": {"workers": 3}}}).compute)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 3 and runner.cluster_kwargs["processes"] is True
    runner = build_task_runner(parse_params({"compute": {"engine": "dask", "address": "tcp://10.0.0.5:8786"}}).compute)
    assert runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(UserError, match="compute.engine"):
        build_task_runner(parse_params({"compute": {"engine": "ray"}}).compute)
