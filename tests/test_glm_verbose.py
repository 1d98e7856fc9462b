"""The GLMs' fit messages (``verbose``) and their documented fitted attributes.

nilearn's estimator checks (tests/peer) ask the same things of nilearn's
tiny data; these run on a tiny surface run of our own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage
from numpydoc.docscrape import NumpyDocString

from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import SecondLevelModel


@pytest.fixture
def surface_run():
    coords = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = np.array([[1, 0, 2], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    mesh = PolyMesh(left=InMemoryMesh(coords, faces), right=InMemoryMesh(coords + 2, faces))
    rng = np.random.default_rng(0)
    run = SurfaceImage(mesh, {"left": rng.normal(size=(4, 6)), "right": rng.normal(size=(4, 6))})
    design = pd.DataFrame({"task": rng.normal(size=6), "constant": np.ones(6)})
    return run, design


@pytest.mark.parametrize("verbose", [0, False])
def test_quiet_by_default(surface_run, capsys, verbose):
    FirstLevelModel(verbose=verbose).fit(surface_run[0], design_matrices=surface_run[1])
    assert capsys.readouterr().out == ""


def test_verbose_levels(surface_run, capsys):
    outputs = {}
    for verbose in (1, 2):
        FirstLevelModel(verbose=verbose).fit(surface_run[0], design_matrices=surface_run[1])
        outputs[verbose] = capsys.readouterr().out
    assert "[FirstLevelModel.fit] Computing run 1 out of 1 runs" in outputs[1]
    assert "[FirstLevelModel.fit] Computation of 1 runs' graphs done in" in outputs[1]
    assert "Extracting region signals" not in outputs[1]
    # level 2 adds the staging of the run and the embedded masker's own messages
    assert "[FirstLevelModel.fit] Extracting region signals: 1 runs staged" in outputs[2]
    assert "MultiSurfaceMasker.fit" in outputs[2]


def test_documented_attributes_are_set_by_fit(surface_run):
    """The Attributes section lists what fit sets; the properties computed on read (labels_,
    results_, ...) are described in Notes and still work after fit."""
    model = FirstLevelModel(minimize_memory=False).fit(surface_run[0],
                                                        design_matrices=surface_run[1])
    documented = {item.name for item in NumpyDocString(FirstLevelModel.__doc__)["Attributes"]}
    fitted = {name for name in vars(model) if name.endswith("_") and not name.startswith("_")}
    assert documented == fitted
    assert len(model.labels_) == len(model.results_) == len(model.r_square_) == 1


@pytest.fixture
def surface_maps(surface_run):
    run, _ = surface_run
    maps = [SurfaceImage(run.mesh, {hemi: values[:, k] for hemi, values in run.data.parts.items()})
            for k in range(4)]
    return maps, pd.DataFrame({"intercept": np.ones(4)})


def test_second_level_verbose(surface_maps, capsys):
    maps, design = surface_maps
    SecondLevelModel().fit(maps, design_matrix=design)
    assert capsys.readouterr().out == ""
    outputs = {}
    for verbose in (1, 2):
        SecondLevelModel(verbose=verbose).fit(maps, design_matrix=design)
        outputs[verbose] = capsys.readouterr().out
    assert "[SecondLevelModel.fit] Fitting second level model" in outputs[1]
    assert "[SecondLevelModel.fit] Computation of second level model (4 maps) done in" in outputs[1]
    assert len(outputs[2]) > len(outputs[1])  # the embedded masker's messages


def test_second_level_documented_attributes_are_set_by_fit(surface_maps):
    maps, design = surface_maps
    model = SecondLevelModel(minimize_memory=False).fit(maps, design_matrix=design)
    documented = {item.name for item in NumpyDocString(SecondLevelModel.__doc__)["Attributes"]}
    fitted = {name for name in vars(model) if name.endswith("_") and not name.startswith("_")}
    assert documented == fitted
    model.compute_contrast("intercept")
    assert len(model.labels_) == 8 and model.results_ and model.r_square_ is not None
