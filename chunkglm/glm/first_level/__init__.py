"""First-level GLM with nilearn's names (``nilearn.glm.first_level``).

- :mod:`~chunkglm.glm.first_level.model`: :class:`FirstLevelModel`;
- :mod:`~chunkglm.glm.first_level.from_bids`: :func:`first_level_from_bids`
  for fMRIPrep-style folders and cohort stores;
- the design matrices are nilearn's (:func:`make_first_level_design_matrix`).

The evaluation of many models (:func:`persist_fits`, :func:`fitted_in_waves`)
and the diagnosis of worker deaths (:class:`WorkerDiedError`,
:func:`explain_worker_deaths`, :func:`locate_task`) live in the graph layer
(:mod:`chunkglm.graph.evaluate`, :mod:`chunkglm.graph.faults`) and are
re-exported here, where users of earlier versions import them.
"""

from chunkglm.design.first_level import make_first_level_design_matrix
from chunkglm.glm.first_level.from_bids import first_level_from_bids
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.graph.evaluate import fitted_in_waves, persist_fits
from chunkglm.graph.faults import WorkerDiedError, explain_worker_deaths, locate_task, worker_died_error

__all__ = ["FirstLevelModel", "WorkerDiedError", "explain_worker_deaths", "first_level_from_bids",
           "fitted_in_waves", "locate_task", "make_first_level_design_matrix", "persist_fits",
           "worker_died_error"]
