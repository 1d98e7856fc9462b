"""Exception hierarchy. Every message says what was received and what to do."""

import numpy as np


class ChunkglmError(Exception):
    """Base class of every error chunkglm raises on purpose."""


class InputError(ChunkglmError, ValueError):
    """The images, tables or folders given as input cannot be used as they are."""


class SingularContrastError(InputError, np.linalg.LinAlgError):
    """An F contrast whose rows are linearly dependent on the design (nilearn raises numpy's
    LinAlgError "Singular matrix" for it; this is one too)."""


class CorruptInputError(InputError):
    """An input file's bytes are damaged (a truncated or corrupt compressed stream)."""


class StoreError(ChunkglmError):
    """The cohort store is missing, unreadable or not a chunkglm store."""


class NodeBusyError(StoreError):
    """Another conversion is writing the same store node right now."""


class IncompatibleStoreError(StoreError):
    """The store was written by a chunkglm whose format this version cannot read."""


class ConversionError(ChunkglmError):
    """Some runs could not be converted; the others were written completely.

    Attributes
    ----------
    failures : dict
        Node name -> error message for every run that failed.
    """

    def __init__(self, message, failures):
        super().__init__(message)
        self.failures = dict(failures)


class InputTypeError(ChunkglmError, TypeError):
    """An input is of a type that cannot be used (nilearn raises TypeError for it)."""
