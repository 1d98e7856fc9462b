"""NiMARE's ``nimare.results`` under chunkglm's name: ``from chunkglm.results import MetaResult``.

A re-export of :mod:`chunkglm.meta.results`.
"""

from chunkglm.meta.results import MetaResult

__all__ = ["MetaResult"]
