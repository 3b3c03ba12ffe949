"""2D pictures (PNG, TIFF, ...): a scan or a mask of one slice."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.nifti import SOURCE_ID_KEY
from medseg.io.volume import Volume, _read_problem, split_suffix

logger = logging.getLogger(__name__)


def _image2d_layout(path: Path) -> tuple[tuple[int, int], int, np.dtype]:
    """Reads only the header of a 2D image: ((H, W), channels, dtype)."""
    if split_suffix(path)[1] in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        except Exception as exc:
            raise InputFileError(path, f"not a readable TIFF ({exc})") from None
        spatial, channels = _image_shape_layout(path, shape)
        return spatial, channels, dtype
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            bands = len(im.getbands())
            mode = im.mode
    except Exception as exc:
        raise InputFileError(path, f"not a readable image ({exc})") from None
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "1": np.bool_}.get(
        mode, np.uint8
    )
    channels = 1 if mode == "P" else bands
    return (height, width), channels, np.dtype(dtype)


def _image_shape_layout(
    path: Path, shape: tuple[int, ...]
) -> tuple[tuple[int, int], int]:
    if len(shape) == 2:
        return (shape[0], shape[1]), 1
    if len(shape) == 3 and shape[2] in (1, 2, 3, 4):
        return (shape[0], shape[1]), shape[2]
    raise InputFileError(
        path,
        f"image of shape {shape} is not a 2D greyscale or RGB(A) image "
        "(multi-page stacks are not read as 2D images; store 3D scans as NIfTI)",
    )


def _read_image2d(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """The picture ``(H, W, C)`` and notes about it (:func:`_palette_note`)."""
    notes = ()
    try:
        if split_suffix(path)[1] in (".tif", ".tiff"):
            import skimage.io

            array = np.asarray(skimage.io.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                # palette images keep their indices (label masks), not the palette
                # colours
                array = np.array(im)
                if im.mode == "P":
                    notes = _palette_note(path, array, im.getpalette() or [])
    except Exception as exc:
        raise InputFileError(path, _read_problem(exc)) from None
    spatial, channels = _image_shape_layout(path, array.shape)
    return array.reshape(*spatial, channels), notes


def _palette_note(path: Path, indices: np.ndarray, palette: list[int]) -> tuple:
    """A note when a palette picture's indices, which are read, differ from the greys
    its palette shows them as (a greyscale picture saved with a palette, or a mask of
    0 and 1 shown as black and white): read as indices, a mask's values are right and
    a scan's intensities wrong. Nothing for a palette of colours (label masks drawn in
    colours) or one whose greys are the indices."""
    used = np.unique(indices).tolist()
    colours = [tuple(palette[3 * i : 3 * i + 3]) for i in used]
    if any(len(c) != 3 or len(set(c)) != 1 for c in colours):
        return ()
    greys = [c[0] for c in colours]
    if greys == used:
        return ()

    def listed(values):
        return ", ".join(map(str, values[:4])) + (", ..." if len(values) > 4 else "")

    return (
        f"{path}: a palette picture, read as its palette indices ({listed(used)}), "
        f"which it shows as the greys {listed(greys)}: a mask's values, but not a "
        "scan's intensities (save scans as greyscale pictures)",
    )


def _write_image2d(
    volume: Volume, tmp: Path, dtype: np.dtype, final: Path, source_id=None
) -> None:
    if volume.spatial_dims != 2:
        raise InputFileError(
            final,
            f"a 3D volume cannot be written as a 2D image "
            f"(shape {volume.array.shape}); use .nii.gz",
        )
    suffix = split_suffix(final)[1]
    array = np.asarray(volume.array)
    if array.shape[-1] == 1:
        array = array[..., 0]
    if suffix in (".jpg", ".jpeg"):
        raise InputFileError(
            final, "JPEG is lossy and would alter the values; use .png or .tif"
        )
    if suffix in (".tif", ".tiff"):
        import tifffile

        described = {"description": f"{SOURCE_ID_KEY} {source_id}"} if source_id else {}
        tifffile.imwrite(tmp, array.astype(dtype, copy=False), **described)
        return
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise InputFileError(
            final,
            f"PNG holds only uint8/uint16 values, not {dtype}; use .tif or .nii.gz",
        )
    if dtype == np.uint16 and array.ndim == 3:
        raise InputFileError(final, "16-bit PNG must be single-channel; use .tif")
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if source_id:
        info.add_text(SOURCE_ID_KEY, source_id)
    Image.fromarray(np.ascontiguousarray(array.astype(dtype, copy=False))).save(
        tmp, format="PNG", pnginfo=info
    )


def grey_channel(array: np.ndarray) -> np.ndarray | None:
    """The one channel ``(*S, 1)`` of a greyscale picture stored with colour or
    alpha channels (grey + alpha, RGB, RGBA: red, green and blue equal everywhere,
    alpha constant), or ``None`` when the channels carry more than one grey."""
    count = array.shape[-1]
    if count not in (2, 3, 4):
        return None
    first = array[..., 0]
    colours = range(1, 3) if count >= 3 else range(0)
    if any(not np.array_equal(first, array[..., c]) for c in colours):
        return None
    if count in (2, 4):
        alpha = array[..., -1]
        if alpha.size and not np.all(alpha == alpha.flat[0]):
            return None
    return array[..., :1]
