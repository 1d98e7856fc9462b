"""The GLM models as scikit-learn estimators, as nilearn's: parameters, documentation, tags.

nilearn's own estimator checks run in the peer suite (tests/peer/); the ones that fit on
SurfaceImage data belong to the surface issue, so what they would check of the volume models
is checked here.
"""

from __future__ import annotations

import inspect
import pickle

import pytest
from numpydoc.docscrape import NumpyDocString
from sklearn.base import clone

from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import SecondLevelModel

MODELS = [FirstLevelModel, SecondLevelModel]


@pytest.mark.parametrize("cls", MODELS)
def test_parameters_are_nilearns_in_order_then_chunkglms(cls):
    from nilearn.glm.first_level import FirstLevelModel as NilearnFLM
    from nilearn.glm.second_level import SecondLevelModel as NilearnSLM

    theirs = {FirstLevelModel: NilearnFLM, SecondLevelModel: NilearnSLM}[cls]
    ours = list(inspect.signature(cls.__init__).parameters)[1:]
    nilearns = list(inspect.signature(theirs.__init__).parameters)[1:]
    assert ours[:len(nilearns)] == nilearns
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()}
    for name, param in inspect.signature(theirs.__init__).parameters.items():
        if name != "self":
            assert defaults[name] == param.default, name


@pytest.mark.parametrize("cls", MODELS)
def test_every_parameter_documented_in_order(cls):
    doc = NumpyDocString(cls.__doc__)
    documented = [p.name for p in doc["Parameters"]]
    assert documented == list(inspect.signature(cls.__init__).parameters)[1:]
    assert "default=0" in {p.name: p.type for p in doc["Parameters"]}["verbose"]
    assert doc["Attributes"]


@pytest.mark.parametrize("cls", MODELS)
def test_sklearn_protocol(cls):
    model = cls(smoothing_fwhm=4.0)
    assert clone(model).get_params() == model.get_params()
    assert model.set_params(smoothing_fwhm=6.0) is model and model.smoothing_fwhm == 6.0
    assert "smoothing_fwhm=6.0" in repr(model)
    assert model.__sklearn_tags__().estimator_type == "glm"
    assert model.__sklearn_tags__().input_tags.niimg_like
    assert not model.__sklearn_is_fitted__()
    assert pickle.loads(pickle.dumps(model)).get_params() == model.get_params()
    module = {FirstLevelModel: "first_level", SecondLevelModel: "second_level"}[cls]
    assert model._get_doc_link().endswith(f"/modules/generated/nilearn.glm.{module}.{cls.__name__}.html")
