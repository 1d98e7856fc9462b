"""The one chunk planner: every block and batch sized from one memory budget.

Time (for runs) and image (for map collections) are never split: every model
works along them. Only the voxel axis is blocked. The plan is pure and cheap,
so it is computed identically by the writer and by every reader that needs to
align its blocks with the stored chunks.

The user sets one number, the uncompressed bytes per chunk (``chunk_bytes=``
of :func:`chunkglm.convert` and of the models, ``--chunk-mb`` on the command
line, lowered to a quarter of a worker's ``memory_limit`` by the cluster
config). :class:`MemoryBudget` derives every size from it:

- stored chunks of a (rows, voxel) array: :meth:`MemoryBudget.plan` (64 MiB of float32);
- GLM and permutation task blocks over a store: :meth:`MemoryBudget.tile` (each stored
  chunk whole while it fits the budget; models given no budget keep the store's chunks);
- meta-analysis task blocks: :meth:`MemoryBudget.task_blocks` (32 MiB of float64);
- masker: runs read together per voxel block, :meth:`MemoryBudget.run_batch_bytes`
  (256 MiB); maps kept in memory, :meth:`MemoryBudget.in_memory_limit` (256 MiB);
  maps resampled per step, :meth:`MemoryBudget.group_size` (128 MiB of float64);
- conversion: memory one run's task may hold, :data:`DEFAULT_TASK_MEMORY` (2 GiB, its
  own setting: ``task_memory=`` / ``--task-memory``).

A smaller budget gives proportionally smaller blocks and batches, so it lowers
the worker peak of every model. The kernels keep their own cache-sized tiles
(a few MiB, :mod:`chunkglm.kernels.permutation`, :mod:`chunkglm.kernels.volume_stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dask.utils import parse_bytes

#: Default uncompressed bytes per chunk. Large enough that object-store requests
#: are few, small enough that a worker holds several at once.
DEFAULT_CHUNK_BYTES = 64 * 2**20

#: Default memory one conversion task may hold (a whole run when it fits; else
#: the run is streamed in slabs of time points).
DEFAULT_TASK_MEMORY = 2 * 2**30

#: A budget is lowered to this fraction of a worker's memory limit: a task holds
#: its input block, a float64 copy and the kernels' temporaries.
WORKER_FRACTION = 4

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


def tile_chunks(chunks, max_block: int) -> tuple[int, ...]:
    """Voxel blocks that tile each of ``chunks`` (each stored chunk is still read once),
    none over ``max_block``: a chunk is split into balanced parts (sizes differ by at most one).
    """
    max_block = max(1, int(max_block))
    blocks = []
    for size in chunks:
        parts = max(1, -(-int(size) // max_block))
        base, extra = divmod(int(size), parts)
        blocks += [base + 1] * extra + [base] * (parts - extra)
    return tuple(b for b in blocks if b)


@dataclass(frozen=True)
class MemoryBudget:
    """The user's one memory budget and every block and batch size derived from it.

    Parameters
    ----------
    chunk_bytes : int or str
        Target uncompressed bytes per chunk (``"16MiB"`` or an int > 0).
        ``MemoryBudget()`` gives the package's sizes (64 MiB chunks).

    Examples
    --------
    >>> MemoryBudget("16MiB").plan(200, 10**6).chunks
    (200, 20992)
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self):
        object.__setattr__(self, "chunk_bytes", as_bytes(self.chunk_bytes))

    @classmethod
    def of(cls, value=None) -> MemoryBudget:
        """A budget from what a user passed: None (the default), a MemoryBudget, bytes or "16MiB"."""
        if isinstance(value, MemoryBudget):
            return value
        return cls() if value is None else cls(value)

    def plan(self, n_rows: int, n_voxels: int, itemsize: int = 4) -> ChunkPlan:
        """Stored chunks of a ``(rows, voxel)`` array (:func:`plan_voxel_chunks`)."""
        return plan_voxel_chunks(n_rows, n_voxels, itemsize, self.chunk_bytes)

    def max_block_voxels(self, n_rows: int, itemsize: int = 4) -> int:
        """The largest voxel block :meth:`plan` gives for ``n_rows`` rows (>= 1).

        Blocks rounded up to :data:`VOXEL_ALIGN` count as within the budget, so a
        store written with this budget is never split again by :meth:`tile`.
        """
        block = max(1, self.chunk_bytes // (max(int(n_rows), 1) * int(itemsize)))
        return math.ceil(block / VOXEL_ALIGN) * VOXEL_ALIGN if block > VOXEL_ALIGN else block

    def tile(self, chunks, n_rows: int, itemsize: int = 4) -> tuple[int, ...]:
        """Task blocks over stored voxel ``chunks`` of ``n_rows`` rows: each chunk whole when it
        fits the budget, else split (:func:`tile_chunks`); GLM fits and permutation tests."""
        return tile_chunks(chunks, self.max_block_voxels(n_rows, itemsize))

    def task_block_voxels(self, n_rows: int, itemsize: int = 8) -> int:
        """Voxels of one meta-analysis task block: half the budget of ``itemsize`` values
        (the float64 copy of the input) over ``n_rows`` images, at least :data:`VOXEL_ALIGN`."""
        return max(VOXEL_ALIGN, (self.chunk_bytes // 2) // (int(itemsize) * max(int(n_rows), 1)))

    def task_blocks(self, chunks, n_rows: int, itemsize: int = 8) -> tuple[int, ...]:
        """Meta-analysis task blocks tiling the stored voxel ``chunks`` (:meth:`task_block_voxels`)."""
        return tile_chunks(chunks, self.task_block_voxels(n_rows, itemsize))

    def run_batch_bytes(self) -> int:
        """float32 bytes of one voxel block of the runs a masker reads together (4 chunks)."""
        return 4 * self.chunk_bytes

    def in_memory_limit(self) -> int:
        """Bytes of a masker's non-zero map values kept in memory (4 chunks); past it the
        maps are written to a store."""
        return 4 * self.chunk_bytes

    def group_size(self, n_grid_voxels: int, itemsize: int = 8) -> int:
        """Maps resampled per step on a grid of ``n_grid_voxels`` (2 chunks of float64), >= 1."""
        return max(1, 2 * self.chunk_bytes // (int(itemsize) * max(int(n_grid_voxels), 1)))

    def capped(self, worker_memory: int | str | None) -> tuple[MemoryBudget, str | None]:
        """This budget lowered to ``worker_memory / WORKER_FRACTION`` when larger, and a note
        saying so (None when unchanged or when the worker memory is unknown)."""
        if worker_memory is None:
            return self, None
        limit = max(1, as_bytes(worker_memory) // WORKER_FRACTION)
        if self.chunk_bytes <= limit:
            return self, None
        note = (f"note: chunk size lowered from {self.chunk_bytes / 2**20:.4g} MiB to {limit / 2**20:.4g} MiB, "
                f"a quarter of the workers' memory_limit ({as_bytes(worker_memory) / 2**20:.4g} MiB).")
        return MemoryBudget(limit), note
