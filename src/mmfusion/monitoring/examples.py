"""What drifted: the window items least like the reference, per modality whose embeddings drifted.

A drift verdict says *that* a modality drifted; this shows *which inputs*. Per drifted modality (the verdict's
flagged `embedding_drift[<m>]` checks), a domain classifier (logistic regression on the L2-normalised embeddings,
window vs reference, seeded) gives every window item its probability of being a window item; the probabilities are
cross-validated (`monitor.examples.folds`), so no item is scored by a classifier that was fitted on it. The
`monitor.examples.items` highest are the examples, each beside its `neighbours` nearest reference items (cosine on
the same embeddings), with the predictions and confidences of both and their previews: the window's from the
inference log (`package.log.previews`, read for these few items only), the reference's from the model folder
(`reference/previews.parquet`). The section is built from the modality specs' previews (a MIME type and bytes),
never from a fixed list of modalities, and written into the window's HTML report self-contained (data: URIs),
so it opens offline; the chosen ids and scores go into the JSON verdict (`examples`).
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import URL

from mmfusion import logdb
from mmfusion.config import MonitorParams
from mmfusion.monitoring.checks import SEVERITIES
from mmfusion.monitoring.inference_log import read_previews
from mmfusion.monitoring.reference import MonitorData, read_reference_previews

log = logging.getLogger(__name__)

Previews = dict[str, tuple[str, bytes]]  # {modality: (MIME type, bytes)} of one item


def drifted_modalities(verdict: dict) -> list[str]:
    """The modalities whose embedding check flagged drift in this verdict (its first method, not the info one)."""
    return [c["modality"] for c in verdict.get("checks", [])
            if c["kind"] == "embedding" and c["drifted"] and c["severity"] in SEVERITIES and ":" not in c["name"]]  # fmt: skip


def _unit(arr: np.ndarray) -> np.ndarray:
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


def domain_scores(cur: np.ndarray, ref: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, float]:
    """(each window row's cross-validated probability of being a window row, the classifier's ROC AUC)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = _unit(np.concatenate([cur, ref]).astype(np.float64))
    y = np.r_[np.ones(len(cur), dtype=int), np.zeros(len(ref), dtype=int)]
    folds = max(2, min(int(folds), len(cur), len(ref)))
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, random_state=seed)
    proba = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")[:, 1]
    return proba[: len(cur)], float(roc_auc_score(y, proba))


def choose_examples(cur: MonitorData, ref: MonitorData, modality: str, p: MonitorParams) -> dict[str, Any] | None:
    """The `p.examples.items` window items of `modality` least like the reference, each with its nearest reference
    items: {modality, auc, items: [{row, request_id, item, score, prediction, confidence, neighbours: [...]}]}.
    None when either side has too few rows with the modality to cross-validate."""
    rng = np.random.default_rng(p.seed)
    cur_rows, ref_rows = np.flatnonzero(cur.present(modality)), np.flatnonzero(ref.present(modality))
    if min(len(cur_rows), len(ref_rows)) < 2:
        return None
    cap = p.embeddings.max_rows  # the drift check's own sampling cap (cost)
    cur_rows = cur_rows if len(cur_rows) <= cap else np.sort(rng.choice(cur_rows, cap, replace=False))
    fit_ref = ref_rows if len(ref_rows) <= cap else np.sort(rng.choice(ref_rows, cap, replace=False))
    c, r = cur.embeddings[modality][cur_rows], ref.embeddings[modality]
    scores, auc = domain_scores(c, r[fit_ref], p.examples.folds, p.seed)
    top = np.argsort(-scores, kind="stable")[: p.examples.items]
    sims = _unit(c[top].astype(np.float64)) @ _unit(r[ref_rows].astype(np.float64)).T  # every reference row with it
    items = []
    for k, j in enumerate(top):
        row = cur.rows.iloc[cur_rows[j]]
        near = np.argsort(-sims[k], kind="stable")[: max(0, p.examples.neighbours)]
        items.append({
            "row": int(cur_rows[j]),
            "request_id": str(row["request_id"]) if "request_id" in row else "",
            "item": int(row["item"]) if "item" in row else 0,
            "score": round(float(scores[j]), 4),
            "prediction": str(row["prediction"]),
            "confidence": round(float(row["confidence"]), 4),
            "neighbours": [_reference_item(ref, int(ref_rows[n]), float(sims[k, n])) for n in near],
        })  # fmt: skip
    return {"modality": modality, "auc": round(auc, 4), "window_rows": int(len(cur_rows)), "reference_rows": int(len(fit_ref)),
            "items": items}  # fmt: skip


def _reference_item(ref: MonitorData, row: int, similarity: float) -> dict[str, Any]:
    r = ref.rows.iloc[row]
    return {
        "row": row,
        "id": str(r.get("id", "")),
        "similarity": round(similarity, 4),
        "label": str(r.get("label", "")),
        "prediction": str(r["prediction"]),
        "confidence": round(float(r["confidence"]), 4),
    }


def build_examples(
    cur: MonitorData, ref: MonitorData, verdict: dict, p: MonitorParams, log_url: URL, model_dir: Path
) -> tuple[dict[str, Any], str]:
    """(the verdict's `examples`, the HTML section) of one window: empty when no embedding drifted or
    `monitor.examples.items` is 0. Previews are read for the chosen items only."""
    if p.examples.items <= 0:
        return {}, ""
    chosen = {}
    for m in drifted_modalities(verdict):
        try:
            found = choose_examples(cur, ref, m, p)
        except Exception as exc:  # noqa: BLE001  (the verdict stands without its examples)
            log.warning("monitor: no examples of %s drift: %s", m, exc)
            found = None
        if found:
            chosen[m] = found
    if not chosen:
        return {}, ""
    keys = [(i["request_id"], i["item"]) for e in chosen.values() for i in e["items"]]
    try:
        with logdb.reading(log_url) as conn:
            window_previews = read_previews(conn, keys)
    except Exception as exc:  # noqa: BLE001  (the log was just read: a failure here costs the previews only)
        log.warning("monitor: cannot read the previews of the examples: %s", logdb.first_line(exc))
        window_previews = {}
    ref_previews = read_reference_previews(model_dir, [n["id"] for e in chosen.values() for i in e["items"] for n in i["neighbours"]])
    shown = sum(bool(window_previews.get(k)) for k in keys)
    for e in chosen.values():
        e["previews"] = sum(bool(window_previews.get((i["request_id"], i["item"]))) for i in e["items"])
    html_section = render_section(chosen, ref.modalities, window_previews, ref_previews, shown)
    return chosen, html_section


# ---- the HTML section --------------------------------------------------------------------------------------------

STYLE = (
    "#mmfusion-examples{margin:16px;padding:12px 16px;border-left:6px solid #3b6fb6;background:#f3f7fd;color:#1f1f1f;"
    "font:14px/1.45 system-ui,sans-serif}"
    "#mmfusion-examples h2{font-size:18px;margin:4px 0 6px}#mmfusion-examples h3{font-size:15px;margin:14px 0 4px}"
    ".mmf-grid{display:flex;flex-wrap:wrap;column-gap:28px}"
    ".mmf-ex{display:flex;align-items:flex-start;gap:8px;padding:8px 0;border-top:1px solid #d5dde8}"
    ".mmf-arrow{color:#7a8699;padding-top:28px}.mmf-card{width:180px}"
    ".mmf-card.window{background:#fff;outline:2px solid #d9822b;padding:4px}"
    ".mmf-card img{display:block;max-width:176px;margin:2px 0}.mmf-id{word-break:break-all}"
    ".mmf-text{font-size:13px;background:#fff;border:1px solid #dfe5ee;padding:2px 4px;margin:2px 0;"
    "white-space:pre-wrap;word-break:break-word;max-height:7.5em;overflow:hidden}"
    ".mmf-meta{font-size:12px;color:#44505f}.mmf-none{font-size:12px;color:#7a8699;font-style:italic}"
)


def preview_html(fmt: str, data: bytes) -> str:
    """One preview as HTML: a picture inline as a data: URI, a text escaped, anything else named."""
    if fmt.startswith("image/"):
        return f'<img alt="" src="data:{html.escape(fmt)};base64,{base64.b64encode(data).decode()}">'
    if fmt.startswith("text/"):
        return f'<div class="mmf-text">{html.escape(data.decode("utf-8", "replace"))}</div>'
    return f'<div class="mmf-none">a {html.escape(fmt)} preview ({len(data)} bytes)</div>'


def _card(previews: Previews | None, order: list[str], meta: str, css: str) -> str:
    shown = "".join(preview_html(*previews[m]) for m in order if previews and m in previews)
    body = shown or '<div class="mmf-none">no preview kept</div>'
    return f'<div class="mmf-card {css}">{body}<div class="mmf-meta">{meta}</div></div>'


def render_section(chosen: dict[str, dict], modalities: list[str], window: dict, reference: dict | None, shown: int) -> str:
    """The "what drifted" section: per drifted modality, its examples beside their nearest reference items."""
    esc = html.escape
    notes = []
    if not shown:
        notes.append("No previews were kept for these items: package.log.previews is 0 for their modalities, or the "
                     "log was written before previews existed. Their request ids, scores and predictions are listed.")  # fmt: skip
    if reference is None:
        notes.append("The reference has no previews (written before they existed): re-run `dvc repro evaluate` "
                     "and package the model again to see the reference items.")  # fmt: skip
    parts = [
        f"<style>{STYLE}</style>",
        '<section id="mmfusion-examples"><h2>What drifted: the window items least like the reference</h2>',
        '<div class="mmf-meta">Per modality whose embeddings drifted: the window items a domain classifier (window vs '
        "reference, cross-validated: no item is scored by a classifier fitted on it) finds least like the reference, "
        "each beside its nearest reference items (cosine on the same embeddings).</div>",
        *(f'<p class="mmf-none">{esc(n)}</p>' for n in notes),
    ]
    for m, e in chosen.items():
        order = [m] + [o for o in modalities if o != m]  # the drifted modality first
        parts.append(f"<h3>{esc(m)}: {len(e['items'])} of {e['window_rows']} window items (domain classifier ROC AUC "
                     f"{e['auc']:.2f}, cross-validated, against {e['reference_rows']} reference items)</h3>"
                     '<div class="mmf-grid">')  # fmt: skip
        for i in e["items"]:
            meta = (f"window item, score {i['score']:.2f}<br>predicted <b>{esc(i['prediction'])}</b> ({i['confidence']:.2f})"
                    f'<br><span class="mmf-id">request {esc(i["request_id"])}/{i["item"]}</span>')  # fmt: skip
            cards = [_card(window.get((i["request_id"], i["item"])), order, meta, "window"), '<div class="mmf-arrow">&rarr;</div>']
            for n in i["neighbours"]:
                nmeta = (f'<span class="mmf-id">reference {esc(n["id"])}</span><br>label <b>{esc(n["label"])}</b>, '
                         f"predicted {esc(n['prediction'])} ({n['confidence']:.2f})<br>cosine {n['similarity']:.2f}")  # fmt: skip
                cards.append(_card((reference or {}).get(n["id"]), order, nmeta, "reference"))
            parts.append('<div class="mmf-ex">' + "".join(cards) + "</div>")
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)
