"""The explanations page: a few explained test rows as one offline HTML page with its PNGs beside it.

Each row shows every input of the model by the kind of its parts (`mmfusion.modalities.parts`): image regions as
the image and its heatmap, words coloured in the text, time segments as a coloured bar, a whole value as one
chip; red raised the predicted class's probability, blue lowered it. Nothing is loaded from the network.

    explainer = Explainer(predictor, params.package.explain)
    build_page(explainer, read_item, ids, labels, probabilities, y, 12, out_dir, title="...")
"""

from __future__ import annotations

import base64
import html
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmfusion.explain import Explainer, ExplainTooCostly
from mmfusion.modalities.parts import Parts, RegionParts, png_bytes

LEGEND = ("red: raised the predicted class's probability; blue: lowered it (each input scaled to its own largest "
          "attribution; the number beside an input is the sum of its attributions)")  # fmt: skip

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 20px; color: #222; }
h1 { font-size: 20px; margin: 0 0 6px; } p.note { color: #555; margin: 2px 0; }
.rows { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 10px; margin-top: 12px; }
.row { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; }
.row.error { border-left: 5px solid #c0392b; } .row.correct { border-left: 5px solid #27ae60; }
.head { font-weight: 600; margin-bottom: 4px; } .head .id { color: #777; font-weight: 400; font-size: 12px; }
.inputs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.input { max-width: 100%; } .input .name { color: #555; font-size: 12px; margin-bottom: 2px; }
.input img { width: 128px; height: 128px; object-fit: contain; border: 1px solid #eee; }
.words { max-width: 330px; } .words span { padding: 1px 3px; border-radius: 3px; line-height: 1.9; }
.bar { display: flex; width: 320px; height: 22px; border: 1px solid #ccc; }
.bar div { height: 100%; } .chip { display: inline-block; padding: 3px 8px; border-radius: 4px; }
.absent { color: #999; font-style: italic; }
"""


@dataclass
class ExplainedRow:
    """One explained test row: its id and true label, the explanation (`Explainer.explain`, with overlays) and the
    parts it was computed over (for the images' originals)."""

    id: str
    label: str
    explanation: dict[str, Any]
    parts: Mapping[str, Parts]


def rank_rows(probabilities: np.ndarray, y: np.ndarray) -> tuple[list[int], list[int]]:
    """(correct rows, error rows) in the order the page takes them: by confidence, one row per predicted class before
    a second from any class (so the page shows many classes rather than ten of the easiest one)."""
    pred = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct, errors = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
    return _by_confidence(correct, pred, confidence), _by_confidence(errors, pred, confidence)


def quotas(n: int, correct: int, errors: int) -> tuple[int, int]:
    """(correct rows, error rows) of a page of `n`: half errors (all of them if there are fewer), the rest correct
    (more errors where there are too few correct rows)."""
    n_errors = min(n // 2, errors)
    n_correct = min(n - n_errors, correct)
    return n_correct, min(n - n_correct, errors)


def _by_confidence(rows: np.ndarray, pred: np.ndarray, confidence: np.ndarray) -> list[int]:
    order = rows[np.argsort(-confidence[rows], kind="stable")]
    seen: dict[int, int] = {}
    turn = []
    for r in order:  # the how-many-th row of its predicted class this one is
        seen[pred[r]] = seen.get(pred[r], -1) + 1
        turn.append(seen[pred[r]])
    return [int(order[i]) for i in np.argsort(turn, kind="stable")]


def colour(value: float, top: float) -> str:
    """CSS background (and a text colour that stays readable on it) of an attribution scaled by `top`, the largest
    magnitude: the overlay's red-white-blue map, short of its darkest ends."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps["RdBu_r"](0.5 + 0.4 * float(np.clip(float(value) / (top or 1.0), -1, 1)))
    ink = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "#111"
    return f"background:rgb({round(r * 255)},{round(g * 255)},{round(b * 255)});color:{ink}"


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def _top(values: Sequence[float]) -> float:
    return float(np.max(np.abs(values))) if len(values) else 1.0


def render_input(out_dir: Path, stem: str, m: str, found: Mapping[str, Any] | None, parts: Parts | None) -> str:
    """One input of a row as HTML, by the kind of its parts; writes its PNGs beside the page."""
    head = f'<div class="name">{html.escape(m)}' + (f" ({_signed(found['total'])})" if found else "") + "</div>"
    if found is None:
        return f'<div class="input">{head}<span class="absent">absent</span></div>'
    kind = found["kind"]
    if kind == "regions" and isinstance(parts, RegionParts):
        (out_dir / f"{stem}_{m}.png").write_bytes(png_bytes(parts.value))
        (out_dir / f"{stem}_{m}_heat.png").write_bytes(base64.b64decode(found["overlay_png"]))
        body = (f'<img src="{stem}_{m}.png" alt="{html.escape(m)}"> '
                f'<img src="{stem}_{m}_heat.png" alt="{html.escape(m)}: attributions">')  # fmt: skip
    elif kind == "words":
        top = _top([w["attribution"] for w in found["parts"]])
        body = '<div class="words">' + " ".join(
            f'<span style="{colour(w["attribution"], top)}" title="{_signed(w["attribution"])}">'
            f"{html.escape(w['word'])}</span>" for w in found["parts"]) + "</div>"  # fmt: skip
    elif kind == "segments":
        top = _top([s["attribution"] for s in found["parts"]])
        body = '<div class="bar">' + "".join(
            f'<div style="flex:{s["end_s"] - s["start_s"]:.4f};{colour(s["attribution"], top)}" '
            f'title="{s["start_s"]:.2f}-{s["end_s"]:.2f} s: {_signed(s["attribution"])}"></div>'
            for s in found["parts"]) + "</div>"  # fmt: skip
    else:  # one part per value (or a kind this page does not draw part by part): the whole value's attribution
        values = [p["attribution"] for p in found.get("parts", [])] or [found["total"]]
        body = "".join(f'<span class="chip" style="{colour(v, _top(values))}">{_signed(v)}</span>'
                       for v in values)  # fmt: skip
    return f'<div class="input">{head}{body}</div>'


def render_row(out_dir: Path, index: int, row: ExplainedRow, modalities: Sequence[str]) -> str:
    e = row.explanation
    correct = e["target"] == row.label
    stem = f"row{index:02d}"
    inputs = "".join(render_input(out_dir, stem, m, e["modalities"].get(m), row.parts.get(m)) for m in modalities)
    verdict = "correct" if correct else "error"
    return (f'<div class="row {verdict}"><div class="head">{index + 1}. true <b>{html.escape(row.label)}</b>, '
            f"predicted <b>{html.escape(e['target'])}</b> ({e['probability']:.3f}), {verdict} "
            f'<span class="id">{html.escape(row.id)}</span></div><div class="inputs">{inputs}</div></div>')  # fmt: skip


def write_page(out_dir: Path, title: str, modalities: Sequence[str], rows: Sequence[ExplainedRow],
               notes: Sequence[str] = ()) -> Path:  # fmt: skip
    """`out_dir/index.html` with a section per row (its PNGs beside it); returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = '<div class="rows">' + "".join(render_row(out_dir, i, r, modalities) for i, r in enumerate(rows)) + "</div>"
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in (*notes, LEGEND))
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style>'
    page = (f'<!doctype html>\n<html lang="en"><head>{head}</head><body><h1>{html.escape(title)}</h1>{notes_html}{body}'
            "</body></html>\n")  # fmt: skip
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def build_page(explainer: Explainer, read_item: Callable[[int], Mapping[str, Any]], ids: Sequence[str],
               labels: Sequence[str], probabilities: np.ndarray, y: np.ndarray, n: int, out_dir: Path, title: str,
               notes: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Explain `n` rows (`rank_rows` and `quotas` pick them from the predicted `probabilities` and true classes `y`;
    `read_item(i)` is row i as a Predictor item) and write the page; rows over the explanation cost limit are passed
    over for the next in line. Returns what the page shows, for the stage's report."""
    from tqdm.auto import tqdm

    correct, errors = rank_rows(probabilities, y)
    n_correct, n_errors = quotas(n, len(correct), len(errors))
    groups: list[list[ExplainedRow]] = [[], []]
    skipped = 0
    with tqdm(total=n_correct + n_errors, desc="evaluate: explanations", unit="row", mininterval=2) as bar:
        for group, order, quota in zip(groups, (correct, errors), (n_correct, n_errors)):
            for i in order:
                if len(group) == quota:
                    break
                item = read_item(i)
                try:
                    parts = explainer.check_cost(item)
                except ExplainTooCostly:
                    skipped += 1
                    continue
                explained = explainer.explain(item, overlay=True, parts=parts)
                group.append(ExplainedRow(str(ids[i]), str(labels[i]), explained, parts))
                bar.update()
    # a correct row, an error, a correct row, ...: on a two-column page, correct rows left and errors right
    rows = [r for pair in itertools.zip_longest(*groups) for r in pair if r is not None]
    wrong = sum(r.explanation["target"] != r.label for r in rows)
    found = [f"{len(rows)} test rows: the {len(rows) - wrong} most confident correct ones and {wrong} errors, each "
             f"most confident first (one per predicted class first); the test split has {len(errors)} errors in "
             f"{len(y)} rows."]  # fmt: skip
    if n_errors < n // 2:
        found.append(f"Only {len(errors)} errors in the test split, fewer than half the page ({n // 2}): all shown.")
    if skipped:
        found.append(f"{skipped} rows passed over: explaining them needs more model evaluations than "
                     f"package.explain.max_evaluations ({explainer.settings.max_evaluations}).")  # fmt: skip
    page = write_page(out_dir, title, tuple(explainer.predictor.inputs), rows, [*notes, *found])
    return {"page": str(page), "rows": len(rows), "errors": wrong, "skipped_too_costly": skipped}
