"""The meshes nilearn ships (fsaverage, fsaverage3-6), read once per process.

nilearn's ``load_fsaverage(name)`` builds a ``FileMesh`` for each of its five
surfaces and two hemispheres: each reads its GIFTI file to count vertices, and
reads it again at every access of its coordinates or faces. A GIFTI conversion
needs one of them, the pial surface (``load_fsaverage(name)["pial"]``): its two
files are read here once, their arrays kept (read-only) for the next runs on
the same mesh.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["pial_mesh"]


def pial_mesh(name: str):
    """``load_fsaverage(name)["pial"]`` as a nilearn ``PolyMesh`` of in-memory hemispheres.

    Parameters
    ----------
    name : str
        A mesh nilearn ships: "fsaverage3" ... "fsaverage7", "fsaverage".
        nilearn's error names the meshes it has.
    """
    from nilearn.surface import InMemoryMesh, PolyMesh

    return PolyMesh(**{part: InMemoryMesh(coordinates, faces) for part, (coordinates, faces) in _arrays(name)})


@lru_cache(maxsize=4)
def _arrays(name: str) -> tuple:
    """((part, (coordinates, faces)), ...) of the pial files of ``name``, read-only."""
    from nilearn.datasets import fetch_surf_fsaverage
    from nilearn.surface import load_surf_mesh

    files = fetch_surf_fsaverage(name)
    found = []
    for part in ("left", "right"):
        mesh = load_surf_mesh(files[f"pial_{part}"])
        arrays = tuple(np.array(values) for values in (mesh.coordinates, mesh.faces))
        for values in arrays:
            values.setflags(write=False)
        found.append((part, arrays))
    return tuple(found)
