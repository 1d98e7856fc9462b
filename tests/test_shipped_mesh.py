"""``pial_mesh``: nilearn's ``load_fsaverage(name)["pial"]``, its two files read once per process."""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.datasets import load_fsaverage

from chunkglm.io import shipped_mesh
from chunkglm.io.surface_convert import mesh_grid


def test_pial_mesh_is_nilearns_and_read_once(monkeypatch):
    shipped_mesh._arrays.cache_clear()
    reads = []
    import nilearn.surface

    original = nilearn.surface.load_surf_mesh
    monkeypatch.setattr(nilearn.surface, "load_surf_mesh", lambda path: reads.append(path) or original(path))
    mesh = shipped_mesh.pial_mesh("fsaverage5")
    again = shipped_mesh.pial_mesh("fsaverage5")
    assert len(reads) == 2  # one file per hemisphere, not again for the second run
    want = load_fsaverage("fsaverage5")["pial"]
    for part in ("left", "right"):
        for name in ("coordinates", "faces"):
            got, ref = getattr(mesh.parts[part], name), getattr(want.parts[part], name)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)
            assert not got.flags.writeable  # shared by the runs of the process
        assert again.parts[part].coordinates is mesh.parts[part].coordinates
    # the store's grid (its id hashes the geometry) is the one of nilearn's mesh
    assert mesh_grid(mesh, ["left", "right"], "fsaverage5").grid_id == mesh_grid(
        want, ["left", "right"], "fsaverage5").grid_id


def test_unknown_mesh_is_nilearns_error():
    with pytest.raises(ValueError, match="fsaverage5"):
        shipped_mesh.pial_mesh("fsaverage9")
