"""NIfTI reading as a single streaming pass, and NIfTI writing.

Reading never materialises the whole 4-D image: volumes are decompressed (with
ISA-L's gzip, the fastest reader available) into one reusable buffer and handed
to the caller one at a time, while the compressed bytes are hashed on the way
in. Scaling follows nibabel exactly, so converted values equal
``np.asarray(img.dataobj, dtype=np.float32)``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zlib
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
from isal import igzip, igzip_threaded
from isal.isal_zlib import error as IsalError
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from chunkglm.errors import CorruptInputError, InputError

_READ_BYTES = 8 * 2**20
_HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}


@dataclass(frozen=True)
class NiftiInfo:
    """What the header of one NIfTI file says, read without reading the data.

    Attributes
    ----------
    path : str
        Local path or fsspec URL.
    header_bytes : bytes
        The raw header (348 or 540 bytes), kept so that writing back restores
        every field (qform/sform and codes, zooms, TR, units, descrip).
    shape : tuple of int
        Data shape, 3-D or 4-D.
    dtype : numpy.dtype
        On-disk dtype, with byte order.
    offset : int
        Byte offset of the data (vox_offset).
    slope, inter : float
        Scaling as nibabel applies it (1 and 0 when absent).
    """

    path: str
    header_bytes: bytes
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    slope: float
    inter: float

    @property
    def header(self) -> nib.Nifti1Header:
        """The parsed nibabel header."""
        return header_from_bytes(self.header_bytes)

    @property
    def affine(self) -> np.ndarray:
        """The best affine of the header (sform, else qform), as nibabel."""
        return self.header.get_best_affine()

    @property
    def n_volumes(self) -> int:
        """Volumes in the file (1 for a 3-D image)."""
        return self.shape[3] if len(self.shape) == 4 else 1

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """The spatial shape (x, y, z)."""
        return tuple(int(n) for n in self.shape[:3])


def header_from_bytes(header_bytes: bytes) -> nib.Nifti1Header:
    """Parse raw NIfTI-1 or NIfTI-2 header bytes with nibabel."""
    klass = _HEADER_CLASSES[len(header_bytes)]
    return klass.from_fileobj(io.BytesIO(header_bytes), check=False)


def header_to_text(header_bytes: bytes) -> str:
    """Encode raw header bytes for a JSON attribute."""
    return base64.b64encode(header_bytes).decode("ascii")


def header_from_text(text: str) -> bytes:
    """Decode :func:`header_to_text`."""
    return base64.b64decode(text.encode("ascii"))


def is_gzip_path(path: str) -> bool:
    """True for ``.nii.gz`` (and ``.gz`` in general)."""
    return str(path).endswith(".gz")


class _HashingReader(io.RawIOBase):
    """A raw stream that hashes (sha256) every byte read through it.

    Hashing runs on a background thread (hashlib releases the GIL on large
    buffers), overlapping with decompression and voxel gathering instead of
    adding to them.
    """

    def __init__(self, raw):
        self._raw = raw
        self._sha256 = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunkglm-sha256")
        self._pending = None
        self.n_bytes = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self._raw.readinto(buffer)
        if n:
            block = bytes(memoryview(buffer)[:n])  # the caller reuses its buffer
            if self._pending is not None:
                self._pending.result()  # keep order, and at most one block in flight
            self._pending = self._hasher.submit(self._sha256.update, block)
            self.n_bytes += n
        return n

    def hexdigest(self) -> str:
        """sha256 of everything read so far."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return self._sha256.hexdigest()

    def close(self):
        self._hasher.shutdown(wait=True)
        super().close()


def _open_raw(path: str, storage_options: dict | None):
    """Open a local path or fsspec URL for binary reading."""
    if "://" not in str(path):
        return open(path, "rb")
    return fsspec.open(str(path), "rb", **(storage_options or {})).open()


class NiftiReader:
    """One sequential pass over a NIfTI file: header, then volumes.

    Use as a context manager. The compressed bytes are hashed as they are
    read; :meth:`finish` reads to the end and returns the file's sha256.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz``, local or an fsspec URL.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    """

    def __init__(self, path, storage_options=None):
        self.path = str(path)
        self._storage_options = storage_options
        self._raw = None
        self._hasher = None
        self._stream = None
        self.info: NiftiInfo | None = None
        self._pos = 0
        self._next_volume = 0

    def __enter__(self):
        try:
            self._raw = _open_raw(self.path, self._storage_options)
        except FileNotFoundError as err:
            raise InputError(f"input image not found: {self.path}") from err
        self._hasher = _HashingReader(self._raw)
        buffered = io.BufferedReader(self._hasher, buffer_size=_READ_BYTES)
        if is_gzip_path(self.path):
            # Decompression runs on ISA-L's reader thread (it releases the GIL),
            # hashing on another, voxel gathering on the caller's: ~one pass.
            self._stream = igzip_threaded.open(buffered, "rb", threads=1)
        else:
            self._stream = buffered
        self.info = self._read_header()
        return self

    def __exit__(self, *exc):
        for handle in (self._stream, self._hasher, self._raw):
            if handle is not None:
                handle.close()

    def _read_exact(self, n: int) -> bytes:
        with self.decoding():
            data = self._stream.read(n)
        self._pos += len(data)
        return data

    @contextmanager
    def decoding(self):
        """Turn a decompression failure (truncated or corrupt gzip) into an InputError naming the file."""
        try:
            yield
        except InputError:
            raise
        except (EOFError, OSError, zlib.error, IsalError) as err:
            raise CorruptInputError(f"{self.path} is not a readable NIfTI file: the gzip stream is truncated or "
                             f"corrupt ({type(err).__name__}: {err}). Re-copy or re-export the file.") from err

    def _read_header(self) -> NiftiInfo:
        first = self._read_exact(4)
        size = _header_size(first, self.path)
        header_bytes = first + self._read_exact(size - 4)
        if len(header_bytes) < size:
            raise CorruptInputError(f"{self.path} is truncated: its NIfTI header has {len(header_bytes)} of "
                                    f"{size} bytes. Re-copy or re-export the file.")
        try:
            header = header_from_bytes(header_bytes)
            _check_single_file(header, self.path)
            offset = int(header.get_data_offset())
            shape = tuple(int(n) for n in header.get_data_shape())
            dtype = header.get_data_dtype()
            slope, inter = header.get_slope_inter()
        except InputError:
            raise
        except (HeaderDataError, ValueError, TypeError, OverflowError, KeyError) as err:
            # nibabel refuses the header's fields (dim, datatype, offset, scaling...)
            raise CorruptInputError(f"{self.path} has an invalid NIfTI header ({type(err).__name__}: "
                                    f"{str(err).strip().splitlines()[0] if str(err).strip() else 'unreadable'}). "
                                    "Re-export the image, e.g. with nibabel.") from err
        if any(n < 0 for n in shape) or offset < size:
            raise CorruptInputError(f"{self.path} has an invalid NIfTI header (shape {shape}, data offset "
                                    f"{offset}). Re-export the image, e.g. with nibabel.")
        self._read_exact(max(0, offset - self._pos))  # extensions, padding
        return NiftiInfo(
            path=self.path,
            header_bytes=header_bytes,
            shape=shape,
            dtype=dtype,
            offset=offset,
            slope=1.0 if slope is None else slope,
            inter=0.0 if inter is None else inter,
        )

    def iter_volumes(self, start: int = 0, stop: int | None = None):
        """Yield ``(index, raw_volume)`` with raw_volume flat, Fortran order.

        The stream only moves forward: calls must ask for increasing ranges.
        Volumes before ``start`` are decompressed and skipped. The yielded
        array is a view of one reused buffer: copy what you keep.
        """
        info = self.info
        stop = info.n_volumes if stop is None else min(stop, info.n_volumes)
        if start < self._next_volume:
            raise ValueError(f"volume {start} was already read from {self.path} (stream at {self._next_volume})")
        n_values = int(np.prod(info.volume_shape))
        buffer = np.empty(n_values, dtype=info.dtype)
        view = memoryview(buffer).cast("B")
        while self._next_volume < stop:
            index = self._next_volume
            with self.decoding():
                got = self._stream.readinto(view)
            self._pos += got
            if got != buffer.nbytes:
                raise InputError(
                    f"{self.path} is truncated: volume {index} of {info.n_volumes} "
                    f"has {got} of {buffer.nbytes} bytes. Re-copy or re-export the file."
                )
            self._next_volume += 1
            if index >= start:
                yield index, buffer

    def finish(self) -> tuple[str, int]:
        """Read to the end; return (sha256 hex of the file bytes, file size)."""
        with self.decoding():
            while self._stream.read(_READ_BYTES):
                pass
            while self._hasher.read(_READ_BYTES):
                pass
        return self._hasher.hexdigest(), self._hasher.n_bytes


def _header_size(first4: bytes, path: str) -> int:
    for order in ("<", ">"):
        size = int(np.frombuffer(first4, dtype=f"{order}i4")[0]) if len(first4) == 4 else 0
        if size in _HEADER_CLASSES:
            return size
    raise InputError(
        f"{path} is not a NIfTI file (its first bytes are not a NIfTI-1 or NIfTI-2 "
        "header). Give .nii or .nii.gz images."
    )


def _check_single_file(header, path):
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise InputError(
            f"{path} has NIfTI magic {magic!r}: header/image pairs (.hdr/.img) are not "
            "supported. Convert it to a single .nii or .nii.gz file, e.g. with "
            "nibabel.save(nibabel.load(path), 'out.nii.gz')."
        )


def read_info(path, storage_options=None) -> NiftiInfo:
    """Read only the header of a NIfTI file."""
    with NiftiReader(path, storage_options) as reader:
        return reader.info


def scale_values(raw: np.ndarray, slope, inter) -> np.ndarray:
    """Apply NIfTI scaling exactly as nibabel's ArrayProxy does, as float32.

    Elementwise, so gathering in-mask values before scaling gives the same
    numbers as ``np.asarray(img.dataobj, dtype=np.float32)[mask]``.
    """
    scl_slope, scl_inter = np.asanyarray(slope), np.asanyarray(inter)
    if np.can_cast(scl_slope, np.float32):
        scl_slope = scl_slope.astype(np.float32)
    if np.can_cast(scl_inter, np.float32):
        scl_inter = scl_inter.astype(np.float32)
    scaled = apply_read_scaling(raw, scl_slope, scl_inter)
    return np.asarray(scaled).astype(np.float32, copy=False)


def fortran_indices(ijk: np.ndarray, shape) -> np.ndarray:
    """Flat Fortran-order positions of voxels ``ijk`` (voxel, 3) in a volume."""
    return np.ravel_multi_index(tuple(ijk.T), tuple(shape), order="F")


def load_image(image):
    """A nibabel image from a path or an image, or an InputError naming what was received."""
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise InputError(f"File not found: '{image}' (no such image file).")
        return nib.load(str(image))
    if isinstance(image, nib.spatialimages.SpatialImage):
        return image
    raise InputError(f"expected a NIfTI path or a nibabel image; received {type(image).__name__}.")


def stage_image(image, folder: Path, index: int, argument: str = "run_imgs") -> str:
    """A file for an input image: a link to a path, or an in-memory image saved into ``folder``.

    ``argument`` names the caller's parameter in the error for anything else.
    """
    if isinstance(image, str | Path):
        source = Path(image)
        if not source.is_file():
            raise InputError(f"File not found: '{source}' (no such run image).")
        target = Path(folder) / f"input_{index}{'.nii.gz' if source.name.endswith('.gz') else '.nii'}"
        target.symlink_to(source.absolute())
        return str(target)
    if isinstance(image, nib.spatialimages.SpatialImage):
        target = Path(folder) / f"input_{index}.nii"
        nib.save(image, target)
        return str(target)
    raise InputError(f"{argument} entries must be store runs, NIfTI paths or images; received "
                     f"{type(image).__name__}.")


def mask_from_voxels(ijk, shape, affine) -> nib.Nifti1Image:
    """A uint8 mask image with 1 at the voxels ``ijk`` (n_voxels, 3) of a ``shape`` grid."""
    data = np.zeros(shape, dtype=np.uint8)
    data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
    return nib.Nifti1Image(data, affine)


def image_from_voxels(values, ijk, shape, header_bytes=None, affine=None, dtype=np.float32):
    """Build a NIfTI image (float32 unless ``dtype`` says otherwise) from in-mask values.

    Parameters
    ----------
    values : ndarray of shape (n_rows, n_voxels) or (n_voxels,)
        Rows become the 4th dimension; a 1-D input gives a 3-D image.
    ijk : ndarray of shape (n_voxels, 3)
        Voxel indices.
    shape : tuple of 3 int
        Spatial shape.
    header_bytes : bytes, optional
        Original header to restore (qform/sform, zooms incl. TR, units).
    affine : ndarray of shape (4, 4), optional
        Used when there is no original header.
    """
    values = np.asarray(values, dtype=dtype)
    rows = values.reshape(1, -1) if values.ndim == 1 else values
    data = np.zeros((*shape, rows.shape[0]), dtype=dtype)
    data[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = rows.T
    if values.ndim == 1:
        data = data[..., 0]
    if header_bytes is None:
        img = nib.Nifti1Image(data, affine)
    else:
        header = header_from_bytes(header_bytes)
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # The header's own best affine leaves its qform/sform and codes untouched.
        img = klass(data, header.get_best_affine(), header=header)
        if data.ndim == 3:
            img.header.set_zooms(header.get_zooms()[:3])
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return img


#: Units a written NIfTI header states where its own say "unknown" (the grids are in mm, TRs in s).
DEFAULT_UNITS = ("mm", "sec")


def image_bytes(img, units: bool = True) -> bytes | None:
    """The single-file NIfTI bytes of ``img`` (None for other formats).

    ``units``: a header whose spatial or temporal unit is "unknown" gets mm / s
    (:data:`DEFAULT_UNITS`) in the written bytes; ``img`` itself is left as it is.
    """
    header = getattr(img, "header", None)
    if not isinstance(img, nib.Nifti1Image) or not isinstance(header, nib.Nifti1Header):
        return None
    raw = bytearray(img.to_bytes())
    if units:
        written = type(header).from_fileobj(io.BytesIO(bytes(raw)), check=False)
        space, time = written.get_xyzt_units()
        if "unknown" in (space, time):
            written.set_xyzt_units(DEFAULT_UNITS[0] if space == "unknown" else space,
                                   DEFAULT_UNITS[1] if time == "unknown" else time)
            block = written.binaryblock
            raw[:len(block)] = block
    return bytes(raw)


def save_map(img, path, *, units: bool = True) -> Path:
    """:func:`save_image` for a derivative map: float64 data are written as float32, the
    derivatives' dtype (the models hand out float64 images, as nilearn's); other dtypes
    (masks, integer maps) as they are."""
    if img.get_data_dtype() == np.float64:
        data = np.asarray(img.dataobj, dtype=np.float32)
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        img = type(img)(data, img.affine, header)
    return save_image(img, path, units=units)


def save_image(img, path, *, units: bool = True) -> Path:
    """Save a nibabel image, byte for byte the same on every run.

    ``.nii.gz`` is compressed with ISA-L (fast) into a gzip member without a file
    name or a time stamp (``mtime`` 0), so the same image always gives the same
    file. NIfTI headers state their units (see :func:`image_bytes`; ``units=False``
    keeps the header as it is, e.g. to write a converted run back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = image_bytes(img, units)
    if raw is None:
        nib.save(img, path)
        return path
    path.write_bytes(igzip.compress(raw, compresslevel=1, mtime=0) if is_gzip_path(path) else raw)
    return path
