import re

import pytest
import yaml

from mmfusion.config import RENAMED_KEYS, ParamsError, apply_overrides, load_params, params_to_dict, parse_params
from mmfusion.errors import UserError
from tests.conftest import REPO


def _subset(full, part):
    """`part` as found in `full`: the keys `part` has (nested), with `full`'s values."""
    if isinstance(part, dict):
        return {k: _subset(full[k], v) for k, v in part.items()}
    return str(full).lower() if isinstance(part, bool) else full


def _plain(value):
    """A YAML bool written into a string param (package.batching.enabled: true) reads back as a string."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value).lower() if isinstance(value, bool) else value


def test_repo_params_load_with_every_value_as_written():
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    loaded = params_to_dict(load_params(REPO / "params.yaml"))
    assert _subset(loaded, written) == _plain(written)
    assert parse_params(loaded) == load_params(REPO / "params.yaml")


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_a_renamed_key_names_its_new_name(old):
    data: dict = {}
    *parents, key = old.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = 1
    message = re.escape(f"{old} was renamed to {RENAMED_KEYS[old]}")
    with pytest.raises(ParamsError, match=message):
        parse_params(data)
    with pytest.raises(ParamsError, match=message):
        apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), [f"{old}=2"])


def test_the_log_keeps_texts_and_no_images_unless_told():
    from mmfusion.modalities import keep_shares

    assert keep_shares(["image", "text"], load_params(REPO / "params.yaml").package.log.keep) == {"image": 0.0, "text": 1.0}
    assert keep_shares(["image"], parse_params({"package": {"log": {"keep": {"image": 0.25}}}}).package.log.keep) == {"image": 0.25}
    with pytest.raises(UserError, match=r"names \['audio'\], not an input of this model"):
        keep_shares(["image", "text"], {"audio": 1.0})
    with pytest.raises(UserError, match="between 0 and 1"):
        keep_shares(["image"], {"image": 2})


def test_one_cpu_threads_key_in_every_section_that_sets_threads():
    params = load_params(REPO / "params.yaml")
    assert {params.featurize.cpu_threads, params.train.cpu_threads, params.package.cpu_threads} <= {0, 1, 2}
    for section in ("featurize", "train", "package"):
        assert "cpu_threads" in params_to_dict(getattr(params, section))


def test_weighted_sum_weights_are_numbers():
    p = parse_params({"train": {"fusion": {"weighted_sum_weights": {"image": 0.4, "text": 1}}}})
    assert p.train.fusion.weighted_sum_weights == {"image": 0.4, "text": 1.0}
    with pytest.raises(ParamsError, match="weighted_sum_weights.image: expected a number"):
        parse_params({"train": {"fusion": {"weighted_sum_weights": {"image": "0.4"}}}})


def test_overrides_parse_as_dvc_exp_run_does():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    out = apply_overrides(data, ["train.lr=1e-3", "train.strategies=[concat,gated]", "featurize.encoders.text=hf:x"])
    assert out["train"]["lr"] == 0.001 and out["train"]["strategies"] == ["concat", "gated"]
    assert out["featurize"]["encoders"] == {"image": "efficientnet_lite0", "text": "hf:x"}
    assert data["train"]["lr"] == yaml.safe_load((REPO / "params.yaml").read_text())["train"]["lr"]  # not changed
    with pytest.raises(ParamsError, match="clean.min_txt_chars; allowed keys in clean: .*min_text_chars"):
        apply_overrides(data, ["clean.min_txt_chars=3"])
    with pytest.raises(ParamsError, match="not of the form"):
        apply_overrides(data, ["augment.views"])


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ParamsError) as exc:
        parse_params({"clean": {"min_txt_chars": 3}})
    msg = str(exc.value)
    assert "clean.min_txt_chars" in msg and "min_text_chars" in msg


def test_unknown_section_is_an_error():
    with pytest.raises(ParamsError, match="trian"):
        parse_params({"trian": {}})


def test_nested_unknown_key():
    with pytest.raises(ParamsError, match="ingest.manifest.paht"):
        parse_params({"ingest": {"manifest": {"paht": "x.csv"}}})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"clean": {"min_text_chars": "three"}}, "expected an integer"),
        ({"clean": {"lowercase": "yes"}}, "expected true or false"),
        ({"validate": {"text_length": [1]}}, "expected 2 values"),
        ({"split": {"seed": 1.5}}, "expected an integer"),
    ],
)
def test_type_errors(data, fragment):
    with pytest.raises(ParamsError, match=fragment):
        parse_params(data)


def test_params_are_frozen_and_coerced():
    params = parse_params({"validate": {"text_length": [2, 50]}, "augment": {"rotation": 5}})
    assert params.validate.text_length == (2, 50)
    assert isinstance(params.augment.rotation, float)
    with pytest.raises(Exception):
        params.augment.views = 5  # type: ignore[misc]


def test_the_feedback_folder_is_named_once_or_the_same_twice(tmp_path):
    """export writes retrain.export_dir/train and ingest reads ingest.feedback_dir: they must be one folder."""
    with pytest.raises(ParamsError, match=r"ingest.feedback_dir \(feedback/train\) must be retrain.export_dir/train"):
        parse_params({"retrain": {"export_dir": "labels"}})
    assert parse_params({"retrain": {"export_dir": "labels/"}, "ingest": {"feedback_dir": "labels/train"}})
    assert parse_params({"retrain": {"export_dir": "labels"}, "ingest": {"feedback_dir": ""}})  # no feedback ingested
