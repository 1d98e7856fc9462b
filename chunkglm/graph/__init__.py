"""dask plumbing only: map kernels over voxel blocks, tree reductions."""
