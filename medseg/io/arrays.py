"""NumPy arrays (.npy) as scans."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io.volume import Volume, _read_problem

logger = logging.getLogger(__name__)


def _load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputFileError(
                path, "holds Python objects (pickled); refused for safety"
            ) from None
        raise InputFileError(path, f"not a valid .npy file ({exc})") from None
    except Exception as exc:
        raise InputFileError(
            path, f"not a valid .npy file ({_read_problem(exc)})"
        ) from None


def _npy_layout(
    path: Path, shape: tuple[int, ...], spatial_dims: int | None
) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(n) for n in shape)
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims}")
    if len(shape) == 2 and spatial_dims in (None, 2):
        return shape, 1
    if len(shape) == 3:
        return (shape[:2], shape[2]) if spatial_dims == 2 else (shape, 1)
    if len(shape) == 4 and spatial_dims in (None, 3):
        return shape[:3], shape[3]
    raise InputFileError(
        path,
        f"array of shape {shape} is not a 2D or 3D scan (spatial_dims={spatial_dims})",
    )


def _write_npy(volume: Volume, path: Path, dtype: np.dtype) -> None:
    array = np.asarray(volume.array).astype(dtype, copy=False)
    if array.shape[-1] == 1:
        array = array[..., 0]
    if not np.allclose(volume.affine, np.eye(4)):
        logger.warning("%s: .npy stores no geometry; the affine is not written", path)
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
