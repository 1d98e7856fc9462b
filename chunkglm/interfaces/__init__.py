"""Interfaces to other formats: BIDS-like GLM derivatives.

``save_glm_to_bids`` (nilearn's file set, first and second level),
``save_glm_derivatives`` (the ``derivatives/glm/first_level`` layout) and
``save_group_derivatives`` (``derivatives/glm/group_level``; ``permutation_contrasts`` gives the
contrasts whose permutation maps it can write) are imported on first use, so that
``import chunkglm.interfaces`` stays cheap. Names, labels, staging and sidecars are those of
every derivative output: :mod:`chunkglm.io.derivatives`.
"""

__all__ = ["permutation_contrasts", "save_glm_derivatives", "save_glm_to_bids", "save_group_derivatives"]


def __getattr__(name):
    if name in __all__:
        from chunkglm.interfaces import bids

        return getattr(bids, name)
    raise AttributeError(f"module 'chunkglm.interfaces' has no attribute {name!r}")
