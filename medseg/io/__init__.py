"""Reading and writing scans with their geometry.

Arrays are channels-last everywhere in medseg: a 3D scan is ``(X, Y, Z, C)`` in NIfTI
voxel order, a 2D image is ``(H, W, C)`` (rows, columns, channels). A single-channel
scan still has its channel axis, so ``array[..., c]`` always picks channel ``c``.

Formats: NIfTI-1/2 (:mod:`medseg.io.nifti`), 2D pictures (:mod:`medseg.io.pictures`),
NumPy (:mod:`medseg.io.arrays`), DICOM series and DICOM SEG (:mod:`medseg.io.dicom`,
:mod:`medseg.io.dicom_seg`), MetaImage and NRRD (:mod:`medseg.io.itk`). Every read
checks the declared size before touching the data; every write goes through
:mod:`medseg.io.files`, so an interrupted job never leaves a partial file.
"""

from medseg.io.files import atomic_output, atomic_write_text, hold_folder
from medseg.io.formats import (
    read_channels,
    read_info,
    read_source_id,
    read_volume,
    stack_channels,
    write_volume,
)
from medseg.io.volume import SCAN_SUFFIXES, ScanInfo, Volume, case_name, split_suffix

__all__ = [
    "SCAN_SUFFIXES",
    "ScanInfo",
    "Volume",
    "atomic_output",
    "atomic_write_text",
    "case_name",
    "hold_folder",
    "read_channels",
    "read_info",
    "read_source_id",
    "read_volume",
    "split_suffix",
    "stack_channels",
    "write_volume",
]
