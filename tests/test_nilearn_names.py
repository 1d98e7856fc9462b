"""'Change the import, keep the call': each public nilearn name chunkglm implements resolves
under the same module path with ``nilearn`` replaced by ``chunkglm``, and is chunkglm's."""

from __future__ import annotations

import importlib

import pytest

NAMES = {
    "glm": ["FirstLevelModel", "SecondLevelModel", "save_glm_to_bids", "threshold_stats_img",
            "fdr_threshold", "cluster_level_inference"],
    "glm.first_level": ["FirstLevelModel", "first_level_from_bids", "make_first_level_design_matrix"],
    "glm.second_level": ["SecondLevelModel", "non_parametric_inference", "make_second_level_design_matrix"],
    "glm.thresholding": ["threshold_stats_img", "fdr_threshold", "cluster_level_inference"],
    "glm.io": ["save_glm_to_bids"],
    "interfaces.bids": ["save_glm_to_bids"],
    "reporting": ["get_clusters_table", "make_glm_report", "HTMLReport"],
    "maskers": ["NiftiMapsMasker", "MultiNiftiMapsMasker"],
}


#: chunkglm hands out nilearn's own design builder (the designs are nilearn's by construction)
NILEARNS_OWN = {"make_first_level_design_matrix"}
#: names chunkglm.glm gives that nilearn.glm leaves to its subpackages
NOT_IN_NILEARN = {("glm", "FirstLevelModel"), ("glm", "SecondLevelModel")}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in NAMES.items() for n in names])
def test_nilearn_import_path_resolves_to_chunkglm(module, name):
    if (module, name) not in NOT_IN_NILEARN:
        assert callable(getattr(importlib.import_module(f"nilearn.{module}"), name))  # nilearn's path
    ours = getattr(importlib.import_module(f"chunkglm.{module}"), name)
    assert callable(ours)
    if name not in NILEARNS_OWN:
        assert ours.__module__.startswith("chunkglm."), (module, name, ours.__module__)


def test_one_object_behind_every_path():
    from chunkglm import glm, interfaces, reporting
    from chunkglm.glm import io, thresholding

    assert glm.save_glm_to_bids is io.save_glm_to_bids  # interfaces.bids: a warning wrapper (below)
    assert glm.threshold_stats_img is thresholding.threshold_stats_img
    assert reporting.HTMLReport.__module__ == "chunkglm.reporting.html_report"


def test_interfaces_path_warns_as_nilearns(tmp_path):
    """nilearn 0.14 warns (FutureWarning) when save_glm_to_bids is imported from
    nilearn.interfaces; chunkglm.interfaces.bids.save_glm_to_bids does the same, then saves."""
    from chunkglm.interfaces import bids

    with pytest.warns(FutureWarning, match="Please import from 'nilearn.glm' instead: with chunkglm, import it from 'chunkglm.glm'"), pytest.raises(Exception):
        bids.save_glm_to_bids(object(), "a", out_dir=tmp_path)  # warns first, then the model is refused
