"""Testing utilities: deterministic synthetic BIDS / fMRIPrep-like datasets."""

from chunkglm.testing.synthetic import (
    SIZES,
    SPACE,
    GroundTruth,
    SyntheticDataset,
    SyntheticRun,
    make_synthetic_bids,
)

__all__ = [
    "SIZES",
    "SPACE",
    "GroundTruth",
    "SyntheticDataset",
    "SyntheticRun",
    "make_synthetic_bids",
]
