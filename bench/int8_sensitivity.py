"""Per-layer int8 sensitivity of an encoder on this CPU: which layers, kept in float, make int8 agree with torch.

For an encoder quantised as static QDQ int8 (`featurize.int8`, reduce_range as given), each quantisable
node (Conv, MatMul, Gemm) is quantised *alone* (every other node in float) and the per-item cosine of
the resulting embeddings to torch's is measured on held-out real training inputs: that node's own
error. Then the nodes are kept in float greedily, worst first, over the fully quantised model, until
the fidelity guard (`featurize.int8.min_mean_cosine`, `min_p05_cosine`) passes; each step's cosine and
speed (the int8 session at the encoder's batch size, interleaved with fp32 ONNX) are recorded.

The inputs are exactly the guard's: the seeded calibration sample of the train split and the next
`fidelity_size` distinct training inputs. Writes JSON (default bench/results/int8-sensitivity-<isa>-rr<0/1>.json;
`--compare`: int8-float-nodes-<isa>-rr<0/1>.json).

    python bench/int8_sensitivity.py                        # image encoder, reduce_range as params resolve it
    python bench/int8_sensitivity.py --reduce-range false   # full 8-bit weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmfusion import paths  # noqa: E402
from mmfusion.config import load_params  # noqa: E402
from mmfusion.data.manifest import read_manifest  # noqa: E402
from mmfusion.encoders import create_encoder  # noqa: E402
from mmfusion.features.extract import build_input  # noqa: E402
from mmfusion.modalities import get_modality  # noqa: E402
from mmfusion.encoders.runtime import (  # noqa: E402
    Int8Settings,
    _preprocessed,
    _Reader,
    create_session,
    cpu_isa,
    export_onnx,
    sample_int8_inputs,
)

QUANTISED_OPS = ("Conv", "MatMul", "Gemm")


def cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    a, b = out.astype(np.float64), ref.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def summary(cos: np.ndarray) -> dict:
    return {"mean": round(float(cos.mean()), 5), "p05": round(float(np.quantile(cos, 0.05)), 5), "min": round(float(cos.min()), 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--modality", default="image")
    ap.add_argument("--reduce-range", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for the speed runs")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=12, help="most nodes kept in float in the greedy pass")
    ap.add_argument("--extra-steps", type=int, default=1, help="greedy steps after the guard first passes (the margin)")
    ap.add_argument("--compare", default="", help="instead of the search: float-node lists to compare, ';' between lists, "
                    "',' between nodes ('' = none), cosine and interleaved speed, e.g. ';/_conv_stem/Conv'")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    p = params.featurize
    rr = {"auto": "auto", "true": True, "false": False}[args.reduce_range]
    settings = replace(Int8Settings(**asdict(p.int8)), reduce_range=rr, scheme="static").resolved()
    encoder = create_encoder(p.encoders[args.modality], device="cpu")
    if encoder.int8_scheme != "static":
        ap.error(f"{encoder.name} quantises {encoder.int8_scheme}ally: this search is for static (calibrated) int8 encoders")
    # the guard's own inputs: featurize's source for the modality over the train split (features/build.py)
    source = build_input(args.modality, root=REPO, **get_modality(args.modality).settings_from_params(params))
    rows = read_manifest(REPO / paths.SPLIT / "train.csv")
    values = [v for v in rows[source.column].fillna("").astype(str).tolist() if v.strip()]
    calibration, held = sample_int8_inputs(values, source.content, settings, settings.fidelity_size)
    encoder.calibration = calibration
    feeds = encoder.calibration_feeds()

    items = [encoder.prepare(encoder.item_from_content(c)) for c in held]
    bs = encoder.batch_size
    batches = [encoder.collate(items[i : i + bs]) for i in range(0, len(items), bs)]
    with torch.inference_mode():
        ref = torch.cat([encoder._forward(b).float().cpu() for b in batches]).numpy()
    held_feeds = [encoder.onnx_feed(b) for b in batches]

    work = Path(tempfile.mkdtemp(prefix="int8-sens-"))
    fp32 = work / "fp32.onnx"
    export_onnx(encoder.export_spec(), fp32)
    import onnx

    with _preprocessed(fp32, work / "graph.onnx") as pre:
        graph = onnx.load(str(pre))
        nodes = [n.name for n in graph.graph.node if n.op_type in (encoder.int8_op_types or QUANTISED_OPS)]
        op_of = {n.name: n.op_type for n in graph.graph.node}
        pre_copy = work / "pre.onnx"
        onnx.save(graph, str(pre_copy))

    methods = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

    def quantise(exclude: list[str] | None = None, only: list[str] | None = None) -> Path:
        """As runtime.quantize_int8 does (its settings and op types), with nodes excluded or only some quantised."""
        out = work / f"q-{time.perf_counter_ns()}.onnx"
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(str(pre_copy), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, methods[settings.calibrate_method]),
                        op_types_to_quantize=encoder.int8_op_types, nodes_to_exclude=exclude or [],
                        nodes_to_quantize=only or [])  # fmt: skip
        return out

    def run(path: Path, threads: int = 1) -> np.ndarray:
        sess = create_session(path, threads)
        return np.concatenate([sess.run(None, f)[0] for f in held_feeds])

    def speed(path: Path) -> float:
        sess = create_session(path, args.threads)
        sess.run(None, held_feeds[0])
        start = time.perf_counter()
        for f in held_feeds:
            sess.run(None, f)
        return len(items) / (time.perf_counter() - start)

    t0 = time.perf_counter()
    fp32_cos = summary(cosines(run(pre_copy), ref))
    full = quantise()
    full_cos = cosines(run(full), ref)
    print(f"{len(nodes)} quantisable nodes; fp32 ONNX {fp32_cos}; all int8 {summary(full_cos)}", flush=True)

    if args.compare:
        return compare(args, settings, encoder, pre_copy, quantise, run, speed, ref, fp32_cos, full_cos, len(items))

    own: dict[str, dict] = {}
    for i, name in enumerate(nodes, 1):
        path = quantise(only=[name])
        own[name] = {"op": op_of[name], **summary(cosines(run(path), ref))}
        path.unlink()
        print(f"  [{i}/{len(nodes)}] {name:<40} mean {own[name]['mean']:.5f} p05 {own[name]['p05']:.5f}", flush=True)
    ranked = sorted(nodes, key=lambda n: own[n]["mean"])

    steps = []
    kept: list[str] = []
    passed_at = None
    for k in range(args.max_steps + 1):
        path = full if k == 0 else quantise(exclude=kept)
        s = summary(cosines(run(path), ref))
        ok = s["mean"] >= settings.min_mean_cosine and s["p05"] >= settings.min_p05_cosine
        speeds = {"int8": [], "fp32": []}
        for _ in range(args.speed_rounds):  # interleaved
            speeds["int8"].append(speed(path))
            speeds["fp32"].append(speed(pre_copy))
        step = {"float_nodes": list(kept), **s, "passes_guard": ok,
                "int8_items_per_s": round(statistics.median(speeds["int8"]), 1),
                "fp32_items_per_s": round(statistics.median(speeds["fp32"]), 1)}  # fmt: skip
        steps.append(step)
        print(f"step {k}: float {kept[-1] if kept else '-'}: {s} guard {'passes' if ok else 'fails'}; "
              f"{step['int8_items_per_s']} vs fp32 {step['fp32_items_per_s']} items/s", flush=True)  # fmt: skip
        if ok and passed_at is None:
            passed_at = k
        if (passed_at is not None and k - passed_at >= args.extra_steps) or k >= len(ranked):
            break
        kept.append(ranked[k])

    result = {
        "encoder": encoder.name,
        "modality": args.modality,
        "cpu": platform.processor() or platform.machine(),
        "isa": cpu_isa(),
        "int8": {"reduce_range": settings.reduce_range, "per_channel": settings.per_channel, "calibrate_method": settings.calibrate_method,
                 "calibration_inputs": len(calibration.contents)},
        "held_out_inputs": len(items),
        "batch_size": bs,
        "threads": args.threads,
        "guard": {"min_mean_cosine": settings.min_mean_cosine, "min_p05_cosine": settings.min_p05_cosine},
        "fp32_onnx": fp32_cos,
        "all_int8": summary(full_cos),
        "node_alone": {n: own[n] for n in ranked},
        "greedy": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/int8_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    out = Path(args.out or REPO / "bench" / "results" / f"int8-sensitivity-{cpu_isa()}-rr{int(settings.reduce_range)}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def compare(args, settings, encoder, fp32: Path, quantise, run, speed, ref, fp32_cos, full_cos, n_items: int) -> int:
    """`--compare`: each float-node list's cosine to torch, and its speed against fp32 ONNX in interleaved rounds."""
    lists = [[n for n in part.split(",") if n] for part in args.compare.split(";")]
    models = [(nodes, quantise(exclude=nodes)) for nodes in lists]
    rows = []
    for nodes, path in models:
        s = summary(cosines(run(path), ref))
        ok = s["mean"] >= settings.min_mean_cosine and s["p05"] >= settings.min_p05_cosine
        rows.append({"float_nodes": nodes, **s, "passes_guard": ok, "items_per_s": []})
    fp32_speeds = []
    for _ in range(args.speed_rounds):  # interleaved: every model once per round
        fp32_speeds.append(speed(fp32))
        for row, (_, path) in zip(rows, models):
            row["items_per_s"].append(round(speed(path), 1))
    fp32_median = statistics.median(fp32_speeds)
    for row in rows:
        row["median_items_per_s"] = round(statistics.median(row["items_per_s"]), 1)
        row["vs_fp32"] = round(row["median_items_per_s"] / fp32_median, 2)
        print(f"float {row['float_nodes'] or '-'}: mean {row['mean']} p05 {row['p05']} guard "
              f"{'passes' if row['passes_guard'] else 'fails'}; {row['median_items_per_s']} items/s ({row['vs_fp32']}x fp32)")  # fmt: skip
    result = {
        "encoder": encoder.name, "isa": cpu_isa(), "cpu": platform.processor() or platform.machine(),
        "int8": {"reduce_range": settings.reduce_range, "per_channel": settings.per_channel},
        "held_out_inputs": n_items, "batch_size": encoder.batch_size, "threads": args.threads,
        "guard": {"min_mean_cosine": settings.min_mean_cosine, "min_p05_cosine": settings.min_p05_cosine},
        "fp32_onnx": {**fp32_cos, "median_items_per_s": round(fp32_median, 1), "items_per_s": [round(x, 1) for x in fp32_speeds]},
        "all_int8": summary(full_cos), "compared": rows,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/int8_sensitivity.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    out = Path(args.out or REPO / "bench" / "results" / f"int8-float-nodes-{cpu_isa()}-rr{int(settings.reduce_range)}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
