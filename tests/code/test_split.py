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


def _today_split(df, params):
    """The split before group balancing (fold 0, twice): the emoji data's splits must stay exactly this."""
    from sklearn.model_selection import StratifiedGroupKFold

    from mmfusion.data.split import _cover_train_labels

    def fold0(frame, fraction, seed):
        sgkf = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
        rest, fold = next(sgkf.split(np.zeros(len(frame)), frame["label"], groups=frame["group"]))
        return frame.iloc[rest], frame.iloc[fold]

    rest, test = fold0(df, params.test_fraction, params.seed)
    train, val = fold0(rest, params.val_fraction / (1 - params.test_fraction), params.seed + 1)
    parts = _cover_train_labels({"train": train, "val": val, "test": test})
    return {name: part.sort_values("id").reset_index(drop=True) for name, part in parts.items()}


def _dominated(seed=0):
    """A user's drawings: 15 classes, one author holds ~45% of the rows, another ~15%, 80 authors the rest."""
    rng = np.random.default_rng(seed)
    sizes = {"author-big": 900, "author-second": 300} | {f"author-{a:02d}": int(rng.integers(5, 16)) for a in range(80)}
    rows = [{"id": f"{g}-{k:04d}", "label": f"c{int(rng.integers(15)):02d}", "group": g}
            for g, n in sizes.items() for k in range(n)]  # fmt: skip
    return pd.DataFrame(rows)


def _check_partition(df, parts):
    groups = [set(p["group"]) for p in parts.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sorted(pd.concat(parts.values())["id"]) == sorted(df["id"])
    train_labels = set(parts["train"]["label"])
    assert set(parts["val"]["label"]) <= train_labels and set(parts["test"]["label"]) <= train_labels


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_a_dominant_group_stays_out_of_val_and_test(seed):
    from mmfusion.data.split import group_mix

    df = _dominated()
    params = SplitParams(seed=seed)
    before = group_mix(_today_split(df, params)).set_index("split")
    parts = split_dataset(df, params)
    after = group_mix(parts).set_index("split")
    _check_partition(df, parts)
    assert (before.loc[["val", "test"], "largest_group_share"] > 0.9).all()  # today: one author each
    assert (after.loc[["val", "test"], "largest_group_share"] < 0.1).all()
    assert after.loc["train", "largest_group"] == "author-big"
    for name in ("val", "test"):  # the fold keeps its size: the large groups went to train, not the fold's rows
        assert 0.11 < len(parts[name]) / len(df) < 0.17, name
        assert parts[name]["label"].nunique() == 15, name


@pytest.mark.parametrize("seed", [42, 0, 1, 2, 3])
def test_many_tiny_groups_split_exactly_as_before(seed):
    """Emoji-like data (variant sets of 1-3 rows): the balancing never engages, so metrics cannot move."""
    labels = tuple(f"cat{i}" for i in range(9))
    df = _frame(n_groups=700, labels=labels, seed=seed)
    params = SplitParams(seed=seed)
    new, old = split_dataset(df, params), _today_split(df, params)
    assert all(new[k].equals(old[k]) for k in ("train", "val", "test"))


def test_group_mix_reports_each_split():
    from mmfusion.data.split import group_mix

    parts = {
        "train": pd.DataFrame({"group": ["a", "a", "b", "c"], "label": "x"}),
        "val": pd.DataFrame({"group": ["e", "d", "d", "e", "f"], "label": "x"}),  # a tie: the first name
        "test": pd.DataFrame({"group": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}),
    }
    mix = group_mix(parts).set_index("split")
    assert mix.loc["train"].to_dict() == {"rows": 4, "groups": 3, "largest_group": "a", "largest_group_share": 0.5,
                                          "held_out": 0}  # fmt: skip
    assert mix.loc["val", "largest_group"] == "d" and mix.loc["val", "largest_group_share"] == 0.4
    assert mix.loc["test", "rows"] == 0 and mix.loc["test", "largest_group_share"] == 0.0


def test_too_few_groups_or_a_bad_share_is_a_user_error():
    from mmfusion.errors import UserError

    two = pd.DataFrame({"id": [f"s{i}" for i in range(8)], "label": ["a", "b"] * 4, "group": ["g1", "g2"] * 4})
    with pytest.raises(UserError, match="at least 3"):
        split_dataset(two, SplitParams())
    with pytest.raises(UserError, match="max_group_share"):
        split_dataset(_frame(), SplitParams(max_group_share=0))


def _write_clean(root, df):
    from mmfusion.data.manifest import CLEAN_COLUMNS, write_manifest

    df = df.assign(image="", text=df["id"], source="manifest", license="", width=0, height=0, image_sha256="")
    write_manifest(df[list(CLEAN_COLUMNS)], root / "data/clean/manifest.csv")


def test_split_stage_warns_and_records_when_the_data_cannot_be_balanced(tmp_path, caplog):
    """Three authors: each split is one of them; the pipeline goes on with a warning naming split, group, share."""
    import json

    from mmfusion.config import parse_params
    from mmfusion.stages import split as split_stage

    rows = [{"id": f"{g}-{i:02d}", "label": f"l{i % 3}", "group": g} for g in ("ann", "bob", "cy") for i in range(12)]
    _write_clean(tmp_path, pd.DataFrame(rows))
    with caplog.at_level("WARNING"):
        summary = split_stage.run(parse_params({}), tmp_path)
    check = summary["group_check"]
    assert not check["success"] and check["severity"] == "warning"
    assert check["failed_splits"] == ["val", "test"]
    assert all(summary["group_mix"][s]["groups"] == 1 and summary["group_mix"][s]["largest_group_share"] == 1.0
               for s in ("train", "val", "test"))  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == split_stage.__name__]
    test_group = summary["group_mix"]["test"]["largest_group"]
    assert len(warned) == 2 and f"100% of test (12 rows) is one group, {test_group!r}" in warned[1]
    assert json.loads((tmp_path / "reports/split.json").read_text())["group_check"] == check


def test_split_stage_reports_a_balanced_group_mix(tmp_path):
    from mmfusion.config import parse_params
    from mmfusion.data.manifest import read_manifest
    from mmfusion.stages import split as split_stage

    _write_clean(tmp_path, _dominated())
    summary = split_stage.run(parse_params({}), tmp_path)
    assert summary["group_check"]["success"] and summary["group_check"]["warnings"] == []
    for name in ("train", "val", "test"):
        part = read_manifest(tmp_path / f"data/split/{name}.csv")
        top = part["group"].value_counts()
        mix = summary["group_mix"][name]
        assert mix == {"rows": len(part), "groups": part["group"].nunique(), "largest_group": top.index[0],
                       "largest_group_share": round(top.iloc[0] / len(part), 4)}  # fmt: skip
    assert summary["group_mix"]["train"]["largest_group"] == "author-big"
