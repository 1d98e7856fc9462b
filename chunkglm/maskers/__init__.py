"""Region signals from probabilistic maps (nilearn's maps maskers, out of core)."""

from chunkglm.maskers.maps_masker import MapsMasker, MultiMapsMasker
from chunkglm.maskers.outputs import save_timeseries, save_timeseries_to_store, timeseries_filename

__all__ = ["MapsMasker", "MultiMapsMasker", "save_timeseries", "save_timeseries_to_store",
           "timeseries_filename"]
