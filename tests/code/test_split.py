import numpy as np
import pandas as pd
import pytest

from mmfusion.config import SplitParams
from mmfusion.data.split import split_counts, split_dataset


def _frame(n_groups=120, per_group=3, labels=("a", "b", "c", "d"), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = labels[g % len(labels)] if g % 7 else labels[0]  # some imbalance
        for k in range(int(rng.integers(1, per_group + 1))):
            rows.append({"id": f"s{g}-{k}", "label": label, "group": f"g{g}"})
    return pd.DataFrame(rows)


def test_no_group_in_two_splits_and_everything_assigned():
    df = _frame()
    splits = split_dataset(df, SplitParams(val_fraction=0.15, test_fraction=0.15, seed=3))
    groups = [set(part["group"]) for part in splits.values()]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sorted(pd.concat(splits.values())["id"]) == sorted(df["id"])


def test_stratified_within_tolerance():
    df = _frame(n_groups=400)
    splits = split_dataset(df, SplitParams(val_fraction=0.15, test_fraction=0.15, seed=1))
    overall = df["label"].value_counts(normalize=True)
    for name, part in splits.items():
        share = part["label"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.06, name
    assert 0.10 < len(splits["test"]) / len(df) < 0.20
    assert 0.10 < len(splits["val"]) / len(df) < 0.20


def test_same_seed_same_split_other_seed_differs():
    df = _frame()
    a = split_dataset(df, SplitParams(seed=5))
    b = split_dataset(df, SplitParams(seed=5))
    c = split_dataset(df, SplitParams(seed=6))
    assert all(a[k]["id"].tolist() == b[k]["id"].tolist() for k in a)
    assert a["test"]["id"].tolist() != c["test"]["id"].tolist()


def test_counts_table():
    splits = split_dataset(_frame(), SplitParams())
    table = split_counts(splits)
    assert list(table.columns) == ["train", "val", "test"]
    assert table.to_numpy().sum() == sum(len(p) for p in splits.values())


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        split_dataset(_frame(), SplitParams(test_fraction=0.7))


def test_split_stage_keeps_a_text_only_row_without_an_image_path(tmp_path):
    from mmfusion.config import parse_params
    from mmfusion.data.manifest import CLEAN_COLUMNS, read_manifest, write_manifest
    from mmfusion.stages import split as split_stage

    rows = [{"id": f"s{i}", "image": "" if i == 0 else f"images/s{i}.png", "text": f"t {i}", "label": f"l{i % 3}",
             "group": f"s{i}", "source": "manifest", "license": "", "width": 0 if i == 0 else 40,
             "height": 0 if i == 0 else 40, "image_sha256": "" if i == 0 else f"{i:064x}"} for i in range(30)]  # fmt: skip
    write_manifest(pd.DataFrame(rows, columns=list(CLEAN_COLUMNS)), tmp_path / "data/clean/manifest.csv")
    split_stage.run(parse_params({}), tmp_path)
    out = pd.concat([read_manifest(tmp_path / f"data/split/{s}.csv") for s in ("train", "val", "test")])
    images = out.set_index("id")["image"]
    assert images["s0"] == "" and images["s1"] == "data/clean/images/s1.png"


def test_every_label_of_val_and_test_is_in_train_with_few_groups_per_class():
    """52 classes of 3 rows in 2 groups at a 1/3 + 1/3 split: the folds alone leave classes out of train."""
    rows = [{"id": f"s{c}-{i}", "label": f"class_{c:02d}", "group": f"g{c}-{i // 2}"} for c in range(52) for i in range(3)]
    df = pd.DataFrame(rows)
    for seed in range(5):
        parts = split_dataset(df, SplitParams(val_fraction=0.34, test_fraction=0.34, seed=seed))
        train_labels = set(parts["train"]["label"])
        assert set(parts["val"]["label"]) <= train_labels and set(parts["test"]["label"]) <= train_labels
        assert sum(len(p) for p in parts.values()) == len(df)
        groups = [set(p["group"]) for p in parts.values()]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
