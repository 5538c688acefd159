"""Reading images of any supported format as channel-first arrays: NIfTI, NRRD, MHA, DICOM series, PNG/JPEG/TIFF.

Planar (2D) files are read with PIL whatever their suffix, so an image and its mask get the same (identity) geometry
even when one is a TIFF and the other a PNG; everything else goes to MONAI's default readers (nibabel for NIfTI, ITK
for NRRD, MHA and DICOM series folders).
"""

from __future__ import annotations

import glob
import gzip
import logging
import warnings
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.data.nvimgcodec_pydicom_plugin import is_nvimgcodec_available
from monai.transforms import LoadImage, MapTransform

from ..errors import IrisInputError

logger = logging.getLogger(__name__)

PLANAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_planar(path: str | Path) -> bool:
    """Whether ``path`` is a 2D image file (read as a single-slice volume)."""
    return Path(path).suffix.lower() in PLANAR_SUFFIXES


def output_extension(paths: Sequence[str]) -> str:
    """Suffix of the segmentations written for ``paths``: PNG when every query is a 2D image, NIfTI otherwise."""
    return ".png" if paths and all(is_planar(path) for path in paths) else ".nii.gz"


def output_dtype(extension: str) -> str:
    """Label-map dtype for a segmentation file: 8 bits for PNG, 16 (up to 32767 classes) for volumes."""
    return "uint8" if extension == ".png" else "int16"


class QueryFilesError(IrisInputError, FileNotFoundError):
    """Query images that do not exist."""


def image_files(folder: Path) -> list[str]:
    """The image files of a folder (volumes and 2D images), sorted."""
    suffixes = VOLUME_SUFFIXES + PLANAR_SUFFIXES
    return sorted(str(path) for path in folder.iterdir() if path.is_file() and path.name.lower().endswith(suffixes))


def _nifti_problem(path: Path, data_bytes: int) -> str | None:
    """What is wrong with a NIfTI file's header, or its data size given ``data_bytes`` after decompression."""
    try:
        image = nib.load(str(path))
        shape, dtype, offset = image.shape, image.get_data_dtype(), int(image.dataobj.offset)
    except Exception as error:  # nibabel raises many types for a broken header
        return f"broken NIfTI header ({error})"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_bytes < expected:
        return f"NIfTI data cut short ({data_bytes} of {expected} bytes for shape {tuple(shape)}, {dtype})"
    return None


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be an image (empty, a truncated or corrupt gzip stream, a broken NIfTI header or data cut
    short), else None; cheap enough to run on every query before the first is segmented (a gzip file is decompressed
    as a stream, nothing is kept)."""
    path = Path(path)
    if path.is_dir():
        return None  # a DICOM series folder: read by ITK
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    name = path.name.lower()
    if name.endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    size += len(chunk)
        except (OSError, EOFError, zlib.error) as error:
            return f"corrupt or truncated gzip ({error})"
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_problem(path, size)
    return None


@dataclass
class QueryFiles:
    """The query images to segment, and the unreadable ones skipped (file -> reason)."""

    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> list[dict[str, str]]:
        """The files as a MONAI ``Dataset``'s items (``{"image": path}``)."""
        return [{"image": path} for path in self.files]


def query_files(queries: str | Sequence[str], skip_invalid: bool = False) -> QueryFiles:
    """The query images named by a glob, a folder, a file or a list of files, checked before any is segmented.

    Args:
        queries: a glob, a folder, a file, or a list of files.
        skip_invalid: drop unreadable files with a warning (they are listed in the log) instead of stopping.

    Raises:
        QueryFilesError: naming the pattern that matches nothing, every listed file that does not exist, or every
            unreadable file (unless ``skip_invalid``).
    """
    if isinstance(queries, str):
        if Path(queries).is_dir():
            files = image_files(Path(queries))
        else:
            files = sorted(glob.glob(queries)) if glob.has_magic(queries) else [queries]
        if not files:
            raise QueryFilesError(f"No query image matches {queries!r}: check the path or the glob pattern.")
    else:
        files = [str(query) for query in queries]
    missing = [path for path in files if not Path(path).exists()]
    if missing:
        raise QueryFilesError(f"Query images not found: {', '.join(missing)}.")
    unreadable = {path: reason for path in files if (reason := unreadable_reason(path))}
    if unreadable:
        listed = "; ".join(f"{path}: {reason}" for path, reason in unreadable.items())
        if not skip_invalid:
            raise QueryFilesError(
                f"Unreadable query images: {listed}. Fix or remove them, or pass --skip_invalid True."
            )
        logger.warning(f"Skipping unreadable query images: {listed}.")
    return QueryFiles([path for path in files if path not in unreadable], unreadable)


class _NvImageCodecNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "nvImageCodec is not available" not in record.getMessage()


_NVIMAGECODEC_NOTICE = _NvImageCodecNotice()  # one instance, so that a second call adds no second filter


def quiet_nvimagecodec_notices() -> None:
    """Drop exactly MONAI's notices that the optional nvImageCodec (GPU DICOM decoding) is missing.

    Every ``LoadImage`` registers the nvImageCodec DICOM reader, which then logs and warns that it falls back to
    pydicom, three times per command; pydicom reads DICOM as before, so the notices tell a user nothing to act on.
    Nothing else is filtered. Entry points call it: importing the package leaves the process's logging and warning
    filters alone. Calling it again changes nothing.
    """
    if is_nvimgcodec_available():
        return
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_NVIMAGECODEC_NOTICE)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


class LoadImagesd(MapTransform):
    """Load each key's file (or DICOM series folder) as a channel-first MetaTensor, 2D files with PIL.

    Args:
        keys: keys of the file paths.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self._volume = LoadImage(image_only=True, ensure_channel_first=True)
        self._planar = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self._planar if is_planar(d[key]) else self._volume)(d[key])
        return d
