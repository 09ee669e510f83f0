"""Reading Parquet files without Arrow's exit-time abort.

pyarrow (seen on 26.0.1, apache/arrow#34314) reads Parquet on its own thread pools by default: the CPU
pool decodes columns and the I/O pool pre-buffers column chunks. A process that read a Parquet file that
way aborts at exit about one time in ten on these machines, printing `terminate called without an active
exception` and exiting 134 after its work is done: a `dvc repro` stage would fail, a CLI's one-line
error gains a second line. Measured here: `pd.read_parquet(f)` in a fresh process, 4 aborts in 30;
with `use_threads=False, pre_buffer=False`, 0 in 110. The tables mmfusion reads are small (manifests,
drift reference rows), so the single-threaded read costs nothing noticeable.

Every Parquet read in src/, flows/ and bench/ goes through `read_parquet` (tests/code/test_tables.py).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_parquet(path: str | Path, **kwargs) -> pd.DataFrame:
    """`pd.read_parquet` on the calling thread only (no Arrow thread pools, no pre-buffering)."""
    return pd.read_parquet(path, engine="pyarrow", use_threads=False, pre_buffer=False, **kwargs)
