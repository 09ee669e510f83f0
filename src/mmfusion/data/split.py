"""Stratified, grouped train/val/test split: variants of one item never straddle splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mmfusion.config import SplitParams
from mmfusion.errors import UserError


def _take_fold(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off about `fraction` of `df` as one StratifiedGroupKFold fold: (rest, fold)."""
    n_splits = max(2, round(1 / fraction))
    # A class smaller than n_splits cannot be stratified; sklearn only warns, which is what we want.
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_idx, fold_idx = next(sgkf.split(np.zeros(len(df)), df["label"], groups=df["group"]))
    return df.iloc[rest_idx], df.iloc[fold_idx]


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

    Fractions are approximate: a fold is 1/round(1/fraction) of the data, so 0.15 gives 1/7.
    """
    if not 0 < params.test_fraction < 0.5 or not 0 < params.val_fraction < 0.5:
        raise UserError("split.val_fraction and split.test_fraction must be between 0 and 0.5")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest, test = _take_fold(df, params.test_fraction, params.seed)
        val_share = params.val_fraction / (1 - params.test_fraction)
        train, val = _take_fold(rest, val_share, params.seed + 1)
    parts = _cover_train_labels({"train": train, "val": val, "test": test})
    return {name: part.sort_values("id").reset_index(drop=True) for name, part in parts.items()}


def split_counts(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-class sample counts, one column per split (the table a person checks for balance)."""
    table = pd.DataFrame({name: part["label"].value_counts() for name, part in splits.items()}).fillna(0).astype(int)
    table.index.name = "label"
    return table.sort_index()
