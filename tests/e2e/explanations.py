"""What the e2e runs check of evaluate's explanations page and faithfulness check (a tiny `explain_rows` and
`faithfulness_rows` in their params): both written by a real `dvc repro`, well-formed, from the model's modalities."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd

# tiny sizes for the e2e params: a page of 4 rows, a check of 3 rows at fractions 0, 1/2, 1 with one random order
TINY_EXPLAIN = {"explain_rows": 4, "faithfulness_rows": 3, "faithfulness_steps": 2, "faithfulness_draws": 1}


def check_explanations(proj: Path, rows: int = TINY_EXPLAIN["explain_rows"],
                       checked: int = TINY_EXPLAIN["faithfulness_rows"]) -> tuple[str, pd.DataFrame, dict]:  # fmt: skip
    """Assert the page names its test rows with their true labels and loads nothing from the network, and
    faithfulness.json has curves over fractions 0..1 for every row asked for; returns (page, its rows, the report)."""
    out = proj / "reports" / "evaluate"
    page = (out / "explanations" / "index.html").read_text(encoding="utf-8")
    test = pd.read_csv(proj / "data" / "split" / "test.csv", dtype=str, keep_default_na=False).set_index("id")
    shown = re.findall(r'<span class="id">([^<]+)</span>', page)
    skipped = "more model evaluations than" in page  # rows over package.explain.max_evaluations are passed over
    assert len(shown) == min(rows, len(test)) or (skipped and len(shown) < rows), shown
    for sid in shown:
        assert f"true <b>{html.escape(test.loc[html.unescape(sid), 'label'])}</b>" in page, sid
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert all((out / "explanations" / s).is_file() for s in sources), sources
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)

    report = json.loads((out / "faithfulness.json").read_text())
    fractions = report["fractions"]
    assert fractions[0] == 0 and fractions[-1] == 1 and fractions == sorted(fractions)
    assert report["items"] + report["skipped_too_costly"] == min(checked, len(test))
    for curves in [report["all"], *report["modalities"].values()] if report["items"] else []:
        assert len(curves["top"]) == len(curves["random"]) == len(fractions)
        assert curves["top"][0] == curves["random"][0]  # nothing removed yet: the same probability
        assert curves["auc_top"] >= 0 and curves["auc_random"] >= 0
    assert report["passed"] in ((True, False) if report["items"] else (None,))
    assert (out / "faithfulness.png").stat().st_size > 1000
    return page, test.loc[[html.unescape(s) for s in shown]], report
