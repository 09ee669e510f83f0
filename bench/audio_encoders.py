"""Audio encoders' throughput (clips/s) per runtime on this machine, in one run: what featurize pays per clip.

    python bench/audio_encoders.py                          # 96 clips of the drum kits if built, else tones
    python bench/audio_encoders.py --n 200 --rounds 3 --runtimes torch,onnx

For each audio encoder (logmel_stats, resemblyzer) and each runtime (torch; onnx: the same module exported,
run by ONNX Runtime in fp32; onnx-int8: that export statically quantised, calibrated on a seeded sample of
the same clips), on the same clips:
  featurize   extract_features into an empty cache: hashing, decoding in DataLoader workers, batched encode,
              cache writes (what `dvc repro featurize` pays per new clip)
  encode      the encoder alone on clips already decoded (16 kHz mono, as the audio modality hands them over)
  cosine      each clip's embedding against torch's (mean and min): what the runtime costs in fidelity
and, as the reference, resemblyzer's own `embed_utterance` one clip at a time (`resemblyzer_per_clip`).
Each rate is the best of `--rounds` after one warm-up. The clips are the drum kits built by
bench/datasets/drumkits.py when present (else seeded tones). Writes bench/results/audio-encoders.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

from mmfusion.encoders import create_encoder  # noqa: E402
from mmfusion.encoders.runtime import Int8Settings, sample_calibration  # noqa: E402
from mmfusion.features.cache import FeatureCache  # noqa: E402
from mmfusion.features.extract import extract_features  # noqa: E402
from mmfusion.modalities import specs_for  # noqa: E402
from mmfusion.modalities.audio import write_wav  # noqa: E402

ENCODERS = ("logmel_stats", "resemblyzer")


def clip_files(n: int, drumkits: Path, tmp: Path) -> tuple[Path, list[str], str]:
    """(root, `n` clip paths under it, what they are): the drum kits' (bench/datasets/drumkits.py) if built,
    else seeded tones written as WAV files under `tmp`."""
    manifest = drumkits / "manifest.csv"
    if manifest.exists():
        import pandas as pd

        paths = pd.read_csv(manifest)["audio"].sample(frac=1.0, random_state=0).tolist()[:n]
        return drumkits, paths, f"hydrogen-drumkits clips ({drumkits})"
    rng = np.random.default_rng(0)
    sr = 16000
    (tmp / "audio").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * np.arange(int(sr * rng.uniform(0.3, 3.0))) / sr)
        paths.append(f"audio/tone{i}.wav")
        (tmp / paths[-1]).write_bytes(write_wav(wave.astype(np.float32), sr))
    return tmp, paths, "seeded tones 0.3-3 s"


def best_rate(fn, n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(n / min(times), 2)


def featurize_once(encoder, spec, values: list[str], workers: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp, f"{encoder.fingerprint}-{encoder.precision}", encoder.dim)
        result = extract_features(encoder, spec, values, cache, num_workers=workers, progress=False)
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} clips failed: {list(result.failed.values())[:3]}")
    return result.features


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    stats = {"mean": cos.mean(), "p05": np.quantile(cos, 0.05), "min": cos.min()}
    return {k: round(float(v), 5) for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/audio_encoders.py", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="clips (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="torch,onnx,onnx-int8", help="compared in this run (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=1, help="featurize's DataLoader workers (default %(default)s)")
    ap.add_argument("--drumkits", type=Path, default=Path("/tmp/mmfusion-datasets/drumkits"))
    ap.add_argument("--reduce-range", default="auto", choices=("auto", "true", "false"),
                    help="int8 7-bit weights (default %(default)s: by this CPU)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audio-encoders.json")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    settings = Int8Settings(reduce_range={"true": True, "false": False}.get(args.reduce_range, "auto")).resolved()
    with tempfile.TemporaryDirectory() as scratch:
        root, values, source = clip_files(args.n, args.drumkits, Path(scratch))
        spec = specs_for(["audio"], root)["audio"]
        items = [spec.load(v) for v in values]
        result: dict = {
            "clips": len(items), "source": source, "seconds_of_audio": round(sum(len(x) for x in items) / 16000, 1),
            "threads": torch.get_num_threads(), "featurize_workers": args.workers, "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
            # audio encoders: static int8, no float nodes (neither has a measured list)
            "int8": __import__("dataclasses").replace(settings, scheme="static", float_nodes=()).ident(), "encoders": {},
        }  # fmt: skip
        for name in ENCODERS:
            torch_out = None
            per_runtime = {}
            for runtime in runtimes:
                encoder = create_encoder(name, device="cpu")
                calibration = lambda: sample_calibration(values, spec.content, settings)  # noqa: E731
                t0 = time.perf_counter()
                encoder.set_runtime(runtime, threads=args.threads, cache_dir=Path(scratch) / "onnx", int8=settings, calibration=calibration)
                out = encoder.encode(items).numpy()  # warm-up: weights, export, quantisation, session
                build_s = time.perf_counter() - t0
                torch_out = out if runtime == "torch" else torch_out
                row = {
                    "featurize_clips_per_s": best_rate(lambda: featurize_once(encoder, spec, values, args.workers), len(values), args.rounds),
                    "encode_clips_per_s": best_rate(lambda: encoder.encode(items), len(items), args.rounds),
                    "first_call_s": round(build_s, 2),
                }  # fmt: skip
                if torch_out is not None and runtime != "torch":
                    row["cosine_to_torch"] = cosines(out, torch_out)
                per_runtime[runtime] = row
                print(name, runtime, json.dumps(row), flush=True)
            result["encoders"][name] = per_runtime
        resemblyzer = create_encoder("resemblyzer", device="cpu")
        per_clip = lambda: np.stack([resemblyzer.model.embed_utterance(x) for x in items])  # noqa: E731
        result["resemblyzer_per_clip"] = {
            "encode_clips_per_s": best_rate(per_clip, len(items), args.rounds),
            "max_abs_diff_to_batched": float(np.abs(resemblyzer.encode(items).numpy() - per_clip()).max()),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
