"""chunkglm: out-of-core fMRI statistics on chunked zarr cohort stores.

The public entry points are imported lazily so that ``import chunkglm`` stays
cheap and the numpy-only parts never import dask.
"""

from chunkglm._version import __version__

__all__ = ["__version__", "convert", "open_cohort"]


def __getattr__(name):
    if name == "convert":
        from chunkglm.io.convert import convert

        return convert
    if name == "open_cohort":
        from chunkglm.io.cohort import open_cohort

        return open_cohort
    raise AttributeError(f"module 'chunkglm' has no attribute {name!r}")
