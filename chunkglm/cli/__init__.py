"""The ``chunkglm`` command line."""
