"""NiMARE's ``nimare.correct`` under chunkglm's name: ``from chunkglm.correct import FDRCorrector``.

A re-export of :mod:`chunkglm.meta.correct`.
"""

from chunkglm.meta.correct import Corrector, FDRCorrector, FWECorrector

__all__ = ["Corrector", "FDRCorrector", "FWECorrector"]
