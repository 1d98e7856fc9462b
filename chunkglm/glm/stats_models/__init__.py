"""BIDS Stats Models: a whole model (run, session, subject, dataset nodes) on a cohort store.

:func:`read_model` validates a model (bsmschema); :func:`load_graph` builds pybids'
``BIDSStatsModelsGraph`` on a dataset; :class:`ModelRun` runs its nodes with chunkglm's
first-level models, fixed effects and second-level models, writing fitlins' derivatives.
``chunkglm app`` (:mod:`chunkglm.cli.app`) is the command line.
"""

from chunkglm.glm.stats_models.execute import ANALYSIS_LEVELS, ContrastMaps, ModelRun
from chunkglm.glm.stats_models.layout import load_graph, participant_labels
from chunkglm.glm.stats_models.spec import read_model, validate_model

__all__ = ["ANALYSIS_LEVELS", "ContrastMaps", "ModelRun", "load_graph", "participant_labels", "read_model",
           "validate_model"]
