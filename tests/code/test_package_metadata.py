"""package: the model's metrics go into BentoML metadata, which refuses None."""

import pytest

from mmfusion.stages.package import bento_metadata

# a unimodal winner has no winner-vs-best-unimodal comparison: None (it once crashed `bentoml.models.create`)
UNIMODAL_WINNER = {"strategy": "text_only", "vs_best_unimodal": None, "test": {"accuracy": 0.9, "auroc": None},
                   "list": [1, None, {"a": None, "b": 2}]}


def test_bento_metadata_drops_none_at_every_depth():
    assert bento_metadata(UNIMODAL_WINNER) == {"strategy": "text_only", "test": {"accuracy": 0.9}, "list": [1, {"b": 2}]}


def test_bentoml_accepts_it_and_refuses_the_raw_metrics():
    from bentoml._internal.utils import validate_metadata  # what bentoml.models.create calls

    with pytest.raises(ValueError, match="NoneType"):
        validate_metadata({"metrics": dict(UNIMODAL_WINNER)})
    validate_metadata({"metrics": bento_metadata(UNIMODAL_WINNER)})
