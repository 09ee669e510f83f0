"""Every Parquet read goes through `mmfusion.tables.read_parquet` (Arrow's thread pools abort some exits).

The class of bug: a process that read Parquet with Arrow's default thread pools aborts at exit about one
time in ten (`terminate called without an active exception`, exit 134; apache/arrow#34314). It failed
CI once as a second stderr line after the monitor's one-line error. A direct call anywhere else brings it
back, so this test reads every Python file of src/, flows/ and bench/ for one.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pandas as pd

from mmfusion.tables import read_parquet
from tests.conftest import REPO

DIRECT = {"read_parquet", "read_table", "ParquetFile", "ParquetDataset", "dataset"}
ALLOWED = {REPO / "src" / "mmfusion" / "tables.py"}


def direct_reads(path, root=REPO) -> list[str]:
    """`<module>.read_parquet(...)`-style calls (pd., pq., pyarrow.parquet.) in one file, as 'file:line name'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DIRECT:
            owner = ast.unparse(node.func.value)
            if owner in {"pd", "pandas", "pq", "pyarrow.parquet", "ds", "pyarrow.dataset"}:
                found.append(f"{path.relative_to(root)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_parquet_read_bypasses_the_helper():
    files = [p for d in ("src", "flows", "bench") for p in sorted((REPO / d).rglob("*.py")) if p not in ALLOWED]
    assert len(files) > 50
    offenders = [hit for p in files for hit in direct_reads(p)]
    assert offenders == [], f"read Parquet through mmfusion.tables.read_parquet: {offenders}"


def test_the_scan_sees_a_direct_read(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pandas as pd\nimport pyarrow.parquet as pq\n\ndef f(p):\n    return pd.read_parquet(p), pq.read_table(p)\n")
    assert direct_reads(bad, tmp_path) == ["probe.py:5 pd.read_parquet", "probe.py:5 pq.read_table"]


def test_read_parquet_round_trips_and_exits_cleanly(tmp_path):
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(500)], "x": range(500), "y": [0.5] * 500})
    path = tmp_path / "rows.parquet"
    frame.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(read_parquet(path), frame)
    assert read_parquet(path, columns=["x"]).columns.tolist() == ["x"]
    code = f"from mmfusion.tables import read_parquet; read_parquet({str(path)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert results == [(0, "")] * 6
