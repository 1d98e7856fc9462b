"""Pure numpy kernels on one block (no dask). See ARCHITECTURE.md, Layers."""
