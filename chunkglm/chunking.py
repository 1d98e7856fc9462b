"""The one chunk planner: voxel blocks sized from a memory budget.

Time (for runs) and image (for map collections) are never split: every model
works along them. Only the voxel axis is blocked. The plan is pure and cheap,
so it is computed identically by the writer and by every reader that needs to
align its blocks with the stored chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dask.utils import parse_bytes

#: Default uncompressed bytes per chunk. Large enough that object-store requests
#: are few, small enough that a worker holds several at once.
DEFAULT_CHUNK_BYTES = 64 * 2**20

#: Below this many bytes per chunk, object stores pay more in request latency
#: than in transfer; such chunks are grouped into shards.
MIN_CHUNK_BYTES_UNSHARDED = 4 * 2**20

#: Voxel blocks are multiples of this (cache lines and SIMD widths line up,
#: and blocks of neighbouring stores usually coincide).
VOXEL_ALIGN = 256


@dataclass(frozen=True)
class ChunkPlan:
    """How a ``(rows, voxel)`` array is chunked on disk.

    Attributes
    ----------
    shape : tuple of int
        ``(n_rows, n_voxels)``; rows are time points or images.
    chunks : tuple of int
        ``(n_rows, voxel_block)``: rows are never split.
    shards : tuple of int or None
        ``(n_rows, voxels_per_shard)`` when small chunks are grouped into
        shards, else None.
    """

    shape: tuple[int, int]
    chunks: tuple[int, int]
    shards: tuple[int, int] | None

    @property
    def n_blocks(self) -> int:
        """Number of voxel blocks."""
        return math.ceil(self.shape[1] / self.chunks[1]) if self.shape[1] else 0

    def block_slices(self) -> list[slice]:
        """Voxel slices of the chunks, in order."""
        return _slices(self.chunks[1], self.shape[1])

    def write_slices(self) -> list[slice]:
        """Voxel slices that writers may fill independently (shards or chunks).

        Two tasks writing different write-slices never touch the same object.
        """
        return _slices((self.shards or self.chunks)[1], self.shape[1])


def _slices(step: int, n: int) -> list[slice]:
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def as_bytes(value: int | str) -> int:
    """Parse ``64MiB``, ``"1 GB"`` or an int into a number of bytes (> 0)."""
    n = parse_bytes(value) if isinstance(value, str) else int(value)
    if n <= 0:
        raise ValueError(f"a memory size must be positive; received {value!r}")
    return n


def plan_voxel_chunks(
    n_rows: int,
    n_voxels: int,
    itemsize: int = 4,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
) -> ChunkPlan:
    """Plan voxel blocks so that one chunk holds about ``chunk_bytes``.

    Parameters
    ----------
    n_rows : int
        Time points (runs) or images (map collections); never split.
    n_voxels : int
        In-mask voxels.
    itemsize : int
        Bytes per value (4 for float32).
    chunk_bytes : int or str
        Target uncompressed bytes per chunk, e.g. ``"64MiB"``.

    Returns
    -------
    ChunkPlan
        Blocks are balanced (they differ by at most one alignment unit) so
        that no tiny trailing block makes one task much cheaper than others.
    """
    if n_rows < 1 or n_voxels < 0 or itemsize < 1:
        raise ValueError(
            f"cannot plan chunks for {n_rows} rows x {n_voxels} voxels of "
            f"{itemsize} bytes: rows must be >= 1 and voxels >= 0"
        )
    budget = as_bytes(chunk_bytes)
    row_bytes = n_rows * itemsize
    max_block = max(1, budget // row_bytes)
    n_blocks = max(1, math.ceil(n_voxels / max_block))
    block = math.ceil(n_voxels / n_blocks) if n_voxels else 1
    if block > VOXEL_ALIGN:
        block = min(math.ceil(block / VOXEL_ALIGN) * VOXEL_ALIGN, max(n_voxels, 1))
    shards = _plan_shards(n_rows, n_voxels, block, row_bytes)
    return ChunkPlan((n_rows, n_voxels), (n_rows, block), shards)


def _plan_shards(n_rows, n_voxels, block, row_bytes):
    """Group small chunks into shards of about the unsharded minimum size."""
    chunk_nbytes = block * row_bytes
    n_chunks = math.ceil(n_voxels / block) if n_voxels else 0
    if chunk_nbytes >= MIN_CHUNK_BYTES_UNSHARDED or n_chunks <= 8:
        return None
    per_shard = max(1, MIN_CHUNK_BYTES_UNSHARDED // chunk_nbytes)
    per_shard = min(per_shard, n_chunks)
    return (n_rows, block * per_shard)


def plan_row_slabs(n_rows: int, n_voxels: int, itemsize: int, budget: int | str) -> int:
    """Rows per slab when a whole ``(rows, voxel)`` array exceeds ``budget``.

    Used by the streaming conversion path: the input is read a slab of time
    points at a time, so memory holds at most one slab.
    """
    row_bytes = max(1, n_voxels * itemsize)
    return max(1, min(n_rows, as_bytes(budget) // row_bytes))
