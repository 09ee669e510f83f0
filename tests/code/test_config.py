import pytest

from mmfusion.config import ParamsError, load_params, parse_params
from tests.conftest import REPO


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.source == "emoji"
    assert params.augment.views >= 0


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
