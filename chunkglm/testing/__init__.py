"""Testing utilities: deterministic synthetic BIDS / fMRIPrep-like datasets, assertions."""

from chunkglm.testing.assertions import (
    assert_close_to_scale,
    assert_maps_close,
    raise_if_dask_computes,
    rel_l2,
)

from chunkglm.testing.surface import SurfaceRunFiles, SurfaceTruth
from chunkglm.testing.synthetic import (
    SIZES,
    SPACE,
    GroundTruth,
    SyntheticDataset,
    SyntheticRun,
    make_synthetic_bids,
)

__all__ = [
    "assert_close_to_scale",
    "assert_maps_close",
    "raise_if_dask_computes",
    "rel_l2",
    "SIZES",
    "SPACE",
    "GroundTruth",
    "SurfaceRunFiles",
    "SurfaceTruth",
    "SyntheticDataset",
    "SyntheticRun",
    "make_synthetic_bids",
]
