"""Stratified, grouped train/val/test split: variants of one item never straddle splits, and no group dominates one."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mmfusion.config import SplitParams
from mmfusion.errors import UserError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
HELD_OUT = ("val", "test")  # the splits that measure the model: their group mix is checked
log = logging.getLogger(__name__)


def find_largest_group(part: pd.DataFrame) -> tuple[str, float]:
    """The group with the most rows in `part` and its share of them (ties: the first name); ("", 0.0) if empty."""
    if part.empty:
        return "", 0.0
    counts = part["group"].value_counts()
    top = int(counts.max())
    return str(min(counts.index[counts == top])), top / len(part)


def _list_folds(df: pd.DataFrame, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The non-empty StratifiedGroupKFold folds of `df` as (rest, fold) positions; sklearn's fold 0 first."""
    # sklearn refuses more folds than groups; few groups give larger folds instead of an error
    n_splits = min(n_splits, df["group"].nunique())
    # A class smaller than n_splits cannot be stratified; sklearn only warns, which is what we want.
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(rest, fold) for rest, fold in sgkf.split(np.zeros(len(df)), df["label"], groups=df["group"]) if len(fold)]


def _take_fold(
    df: pd.DataFrame, fraction: float, seed: int, max_share: float, name: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off about `fraction` of `df` as one StratifiedGroupKFold fold named `name`: (rest, fold).

    sklearn places the group with the most uneven label counts (in practice the largest) first, into
    fold 0. Fold 0 is kept while its largest group holds at most `max_share` of it (many small groups:
    the split is what it always was). Else the groups too large to be within `max_share` of a fold stay
    on the rest's side (train), the others are folded again at the same fold size, and the fold with the
    smallest largest-group share is taken (among those within `max_share`: the one missing the fewest
    labels); while no fold is within it, the next largest group joins the rest too.
    """
    n_splits = max(2, round(1 / fraction))
    folds = _list_folds(df, n_splits, seed)
    first = find_largest_group(df.iloc[folds[0][1]])
    if first[1] <= max_share:
        return df.iloc[folds[0][0]], df.iloc[folds[0][1]]
    labels = set(df["label"])
    fold_rows = len(df) / n_splits
    sizes = df["group"].value_counts().sort_index()
    by_size = sizes.sort_values(ascending=False, kind="stable").index  # ties: by name, so runs repeat
    too_large = int((sizes > max_share * fold_rows).sum())
    best = None  # (rank, pinned groups, rest, fold)

    def consider(pool: pd.DataFrame, pinned: int, pool_folds: list) -> None:
        nonlocal best
        for _, fold in pool_folds:
            share = find_largest_group(pool.iloc[fold])[1]
            rank = (max(share, max_share), len(labels - set(pool["label"].iloc[fold])), share)
            if best is None or rank < best[0]:
                best = (rank, pinned, df.loc[df.index.difference(pool.index[fold])], pool.iloc[fold])

    for pinned in range(too_large, len(by_size) - 1):
        pool = df[~df["group"].isin(by_size[:pinned])]
        n = round(len(pool) / fold_rows)
        if n < 2 or pool["label"].value_counts().max() < n:
            break  # what is left is too small for a fold of this size and a rest (sklearn refuses it)
        consider(pool, pinned, _list_folds(pool, n, seed) if pinned else folds)
        if best[0][0] <= max_share:
            break
    if best is None or best[0][0] > max_share:
        consider(df, 0, folds)  # nothing within the limit: today's folds compete too
    rank, pinned, rest, fold = best
    log.info(
        "split: %s would have been %.0f%% group %r; it is now a fold whose largest group holds %.0f%%%s",
        name, 100 * first[1], first[0], 100 * rank[2],
        f", with the {pinned} largest group(s) kept in train" if pinned else "",
    )  # fmt: skip
    return rest, fold


def _cover_train_labels(parts: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every label val or test has must also be in train (a model cannot learn a class it never saw).

    With only a few groups per class, the folds can leave a class out of train; then one of its
    groups moves to train, from whichever of val/test holds more of it. Whole groups move, so no
    group straddles splits; classes train already has are never touched (large data: no change).
    """
    missing = sorted((set(parts["val"]["label"]) | set(parts["test"]["label"])) - set(parts["train"]["label"]))
    for label in missing:
        donor = max(("val", "test"), key=lambda name: int((parts[name]["label"] == label).sum()))
        group = parts[donor].loc[parts[donor]["label"] == label, "group"].iloc[0]
        moving = parts[donor]["group"] == group
        parts["train"] = pd.concat([parts["train"], parts[donor][moving]])
        parts[donor] = parts[donor][~moving]
    return parts


def split_dataset(df: pd.DataFrame, params: SplitParams) -> dict[str, pd.DataFrame]:
    """Split a clean manifest into {'train', 'val', 'test'}, stratified by label, grouped by `group`.

    Fractions are approximate: a fold is 1/round(1/fraction) of the data, so 0.15 gives 1/7 (whole
    groups move together: with few groups it is far off). Groups too large for val or test stay in train.
    """
    if not 0 < params.test_fraction < 0.5 or not 0 < params.val_fraction < 0.5:
        raise UserError("split.val_fraction and split.test_fraction must be between 0 and 0.5")
    if not 0 < params.max_group_share <= 1:
        raise UserError(f"split.max_group_share must be in (0, 1], got {params.max_group_share}")
    if df["group"].nunique() < 3:
        raise UserError(
            f"the data has {df['group'].nunique()} group(s); train, val and test need at least 3, since the rows "
            "of one group never straddle splits (ingest.manifest.group_column)"
        )
    import warnings

    df = df.reset_index(drop=True)  # rows are picked by label (a fold's rest is the frame without it)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest, test = _take_fold(df, params.test_fraction, params.seed, params.max_group_share, "test")
        val_share = params.val_fraction / (1 - params.test_fraction)
        train, val = _take_fold(rest, val_share, params.seed + 1, params.max_group_share, "val")
    parts = _cover_train_labels({"train": train, "val": val, "test": test})
    return {name: part.sort_values("id").reset_index(drop=True) for name, part in parts.items()}


def split_counts(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-class sample counts, one column per split (the table a person checks for balance)."""
    table = pd.DataFrame({name: part["label"].value_counts() for name, part in splits.items()}).fillna(0).astype(int)
    table.index.name = "label"
    return table.sort_index()


def group_mix(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per split: rows, groups, its largest group and that group's share (the table the check runs on)."""
    rows = []
    for name, part in splits.items():
        group, share = find_largest_group(part)
        rows.append({"split": name, "rows": len(part), "groups": int(part["group"].nunique()),
                     "largest_group": group, "largest_group_share": round(share, 4),
                     "held_out": int(name in HELD_OUT)})  # fmt: skip
    return pd.DataFrame(rows)


def check_group_mix(mix: pd.DataFrame, max_share: float) -> dict:
    """Great Expectations check (severity warning): in val and test, no group holds more than `max_share`.

    Returns the check's result with one readable line per split over the limit; the caller logs them
    and goes on (train is reported, not checked: a dominant group belongs there).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.row_conditions import Column

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("mmfusion").add_dataframe_asset(name="group_mix")
    batch = asset.add_batch_definition_whole_dataframe("group_mix_all").get_batch(batch_parameters={"dataframe": mix})
    expectation = gxe.ExpectColumnValuesToBeBetween(
        column="largest_group_share", max_value=max_share, severity="warning", row_condition=Column("held_out") == 1
    )
    result = batch.validate(
        expectation, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["split"]}
    )
    failed = {str(i["split"]) for i in (result.result or {}).get("unexpected_index_list") or []}
    by_split = mix.set_index("split")
    messages = [
        f"{share:.0%} of {name} ({by_split.loc[name, 'rows']} rows) is one group, {group!r} (split.max_group_share: "
        f"{max_share:g}): {name} metrics mostly measure that group; the data has too few other groups to balance it"
        for name, group, share in zip(by_split.index, by_split["largest_group"], by_split["largest_group_share"])
        if name in failed
    ]  # fmt: skip
    return {
        "expectation": expectation.expectation_type,
        "column": "largest_group_share",
        "max_value": max_share,
        "applies_to": list(HELD_OUT),
        "severity": "warning",
        "success": bool(result.success),
        "failed_splits": [name for name in by_split.index if name in failed],
        "warnings": messages,
    }
