"""Region signals from probabilistic maps (nilearn's maps maskers, out of core)."""

from chunkglm.maskers.maps_masker import MapsMasker, MultiMapsMasker, MultiNiftiMapsMasker, NiftiMapsMasker
from chunkglm.maskers.outputs import save_timeseries, save_timeseries_to_store, timeseries_filename

__all__ = ["MapsMasker", "MultiMapsMasker", "MultiNiftiMapsMasker", "NiftiMapsMasker", "save_timeseries",
           "save_timeseries_to_store", "timeseries_filename"]
