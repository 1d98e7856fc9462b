"""Per voxel block of an IBMA fit: the kernels' inputs from the stored maps, then the fit.

Numpy only: the block functions that :meth:`chunkglm.meta.ibma.IBMAEstimator._graph` hands to
:func:`chunkglm.graph.meta.block_maps` and :func:`chunkglm.graph.meta.rows_with_any`.
"""

from __future__ import annotations

import numpy as np

from chunkglm.kernels import meta as km
from chunkglm.kernels.finite import nonfinite_voxels
from chunkglm.meta import _bags
from chunkglm.meta._inputs import DERIVATIONS, MetaMaps


#: Kernel argument name -> map type it reads (old API kernels call beta "con").
_ROLE_OF = {"con": "beta"}


def _role(arg: str, aliases=None) -> str:
    return (aliases or _ROLE_OF).get(arg, arg)


def _stored_roles(roles, maps: MetaMaps | None = None, aliases=None) -> list[str]:
    """Stored map types to read for kernel inputs ``roles`` (derived ones read their sources)."""
    stored = []
    for arg in _image_roles(roles):
        role = _role(arg, aliases)
        if maps is not None and role not in maps.variables and role in DERIVATIONS:
            sources = [s for s in DERIVATIONS[role] if s != "sample_sizes"]
        else:
            sources = [role]
        stored += [s for s in sources if s not in stored]
    return stored


def _image_roles(roles) -> list[str]:
    return [r for r in roles if r != "sample_sizes"]


def _role_arrays(blocks, stored, roles, sample_sizes, aliases=None) -> dict:
    """float64 (K, v) arrays by kernel argument, derived ones computed from their sources."""
    data = {role: np.asarray(b, dtype=np.float64) for role, b in zip(stored, blocks)}
    arrays = {}
    for arg in _image_roles(roles):
        role = _role(arg, aliases)
        if role in data:
            arrays[arg] = data[role]
        elif role == "varcope":
            arrays[arg] = data["se"] ** 2  # NiMARE's se_to_varcope
        elif role == "se":
            arrays[arg] = np.sqrt(np.where(data["varcope"] >= 0, data["varcope"], np.nan))
        elif role == "z":
            arrays[arg] = _t_to_z(data["t"], sample_sizes[:, None] - 1.0)
    return arrays


def _t_to_z(t, dof):
    """NiMARE's ``t_to_z`` (one-tailed log survival, sign restored)."""
    return km.t_to_z(t, dof)


def _fit_block(*blocks, kernel_name, roles, stored, aliases, row_scale, sample_sizes, params, per_study,
               aggressive, outputs):
    """One voxel block: validity, patterns, one kernel call per pattern; then a row flagging
    the voxels with a NaN/inf input (+1) and those of a pattern of one dependence group, not
    fitted (+2).

    Non-finite values are not set to 0 here (nilearn's way): NiMARE's IBMA estimators drop
    every entry that is not finite or is 0 (``nimare.meta.utils._usable``, also what
    ``aggressive_mask`` masks out), and :func:`_bags.validity` does the same.
    """
    skipped = np.zeros(blocks[0].shape[1], dtype=bool)
    maps = _fit_maps(blocks, kernel_name, roles, stored, aliases, row_scale, sample_sizes, params,
                     per_study, aggressive, outputs, skipped)
    flags = nonfinite_voxels(*blocks).astype(maps.dtype) + 2.0 * skipped
    return np.concatenate([maps, flags[None]])


def _fit_maps(blocks, kernel_name, roles, stored, aliases, row_scale, sample_sizes, params, per_study,
              aggressive, outputs, skipped=None):
    arrays = _role_arrays(blocks, stored, roles, sample_sizes, aliases)
    if row_scale is not None:
        arrays = {k: v / row_scale[:, None] for k, v in arrays.items()}
    dtype = blocks[0].dtype if np.issubdtype(blocks[0].dtype, np.floating) else np.float32
    valid = _bags.validity({r: arrays[r] for r in _image_roles(roles)}, dtype)
    args = {r: sample_sizes if r == "sample_sizes" else arrays[r] for r in roles}
    kernel = km.KERNELS[kernel_name]
    return _bags.fit_patterns(kernel, args, valid, outputs, params, aggressive_mask=aggressive,
                              per_study=per_study, skipped=skipped)


def _correlation_moments(block, *, roles, stored, sample_sizes, aliases):
    """The null-correlation moments of one voxel block of the first image input (the z maps)."""
    arrays = _role_arrays([block], stored, roles, sample_sizes, aliases)
    return km.null_correlation_moments(arrays[_image_roles(roles)[0]])


def _image_any_valid(*blocks, roles, stored, sample_sizes, aliases):
    arrays = _role_arrays(blocks, stored, roles, sample_sizes, aliases)
    valid = _bags.validity({r: arrays[r] for r in _image_roles(roles)}, blocks[0].dtype)
    return valid.any(axis=1, keepdims=True)
