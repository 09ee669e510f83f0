"""Audio encoders' throughput (clips/s) on this machine, in one run: what featurize pays per clip.

    python bench/audio_encoders.py                          # 96 clips of the drum kits if built, else tones
    python bench/audio_encoders.py --n 200 --rounds 3 --threads 2

Measures, on the same decoded clips (16 kHz mono, as the audio modality hands them to encoders):
  logmel_stats            the weightless baseline (torch STFT + mel filterbank)
  resemblyzer             the registry's encoder: every clip's 1.6 s windows through the LSTM in one call
  resemblyzer_per_clip    resemblyzer's own `embed_utterance`, one clip at a time (what the encoder did before)
Each is timed `--rounds` times after one warm-up batch; the best round is reported, with the max difference
between the batched and per-clip resemblyzer embeddings. Writes bench/results/audio-encoders.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

from mmfusion.encoders import create_encoder  # noqa: E402
from mmfusion.modalities import specs_for  # noqa: E402


def clips(n: int, drumkits: Path) -> tuple[list[np.ndarray], str]:
    """`n` decoded clips: the drum kits' (bench/datasets/drumkits.py output) if present, else seeded tones."""
    manifest = drumkits / "manifest.csv"
    if manifest.exists():
        import pandas as pd

        spec = specs_for(["audio"], drumkits)["audio"]
        paths = pd.read_csv(manifest)["audio"].sample(frac=1.0, random_state=0).tolist()
        out = []
        for p in paths:
            try:
                out.append(spec.load(p))
            except ValueError:
                continue
            if len(out) == n:
                break
        return out, f"hydrogen-drumkits clips ({drumkits})"
    rng = np.random.default_rng(0)
    sr = 16000
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * np.arange(int(sr * rng.uniform(0.3, 3.0))) / sr)
             ).astype(np.float32) for _ in range(n)], "seeded tones 0.3-3 s"  # fmt: skip


def best_rate(fn, items, rounds: int) -> float:
    fn(items[:4])  # warm-up: lazy imports, weights
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(items)
        times.append(time.perf_counter() - t0)
    return round(len(items) / min(times), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/audio_encoders.py", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="clips (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--drumkits", type=Path, default=Path("/tmp/mmfusion-datasets/drumkits"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audio-encoders.json")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    items, source = clips(args.n, args.drumkits)
    logmel = create_encoder("logmel_stats", device="cpu")
    resemblyzer = create_encoder("resemblyzer", device="cpu")
    per_clip = lambda xs: np.stack([resemblyzer.model.embed_utterance(x) for x in xs])  # noqa: E731
    result = {
        "clips": len(items),
        "source": source,
        "seconds_of_audio": round(sum(len(x) for x in items) / 16000, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "clips_per_s": {
            "logmel_stats": best_rate(logmel.encode, items, args.rounds),
            "resemblyzer": best_rate(resemblyzer.encode, items, args.rounds),
            "resemblyzer_per_clip": best_rate(per_clip, items, args.rounds),
        },
        "resemblyzer_batched_vs_per_clip_max_abs_diff": float(np.abs(resemblyzer.encode(items).numpy() - per_clip(items)).max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
