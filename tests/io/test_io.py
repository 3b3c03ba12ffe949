from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.errors import InputFileError
from medseg.io import (
    atomic_write_text,
    read_info,
    read_source_id,
    read_volume,
    write_volume,
)
from medseg.io.formats import scan_format
from medseg.io.volume import Volume, output_dtype, split_suffix
from tests.conftest import (
    OBLIQUE_LPS,
    REPO,
    save_slicer_segmentation,
    stored_in_another_order,
)

# NIfTI


def test_oblique_lps_nifti_round_trip_keeps_data_affine_codes_units(
    oblique_nifti, tmp_path
):
    path, data = oblique_nifti
    volume = read_volume(path)
    assert volume.array.shape == (9, 7, 5, 1)
    np.testing.assert_array_equal(volume.array[..., 0], data)
    np.testing.assert_allclose(volume.affine, OBLIQUE_LPS, atol=1e-6)
    # column norms of the affine: sqrt(.75^2 + .27^2 + .05^2) = 0.7987...
    np.testing.assert_allclose(
        volume.spacing, np.linalg.norm(OBLIQUE_LPS[:3, :3], axis=0)
    )

    out = write_volume(volume, tmp_path / "copy.nii.gz")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(back.affine, nib.load(path).affine)
    assert int(back.header["sform_code"]) == 2
    assert int(back.header["qform_code"]) == 1
    assert back.header.get_xyzt_units() == ("mm", "msec")
    assert back.header["descrip"].tobytes().startswith(b"medseg test volume")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_float_image_written_as_float32_and_labels_as_uint8(oblique_nifti, tmp_path):
    path, data = oblique_nifti
    volume = read_volume(path)
    scaled = volume.with_array(volume.array.astype(np.float64) / 7.0)
    back = nib.load(write_volume(scaled, tmp_path / "float.nii.gz"))
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.get_fdata(), data / 7.0, rtol=1e-6)
    labels = volume.with_array((volume.array > 0).astype(np.int64) * 2)
    back = nib.load(write_volume(labels, tmp_path / "labels.nii.gz", is_label=True))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (data > 0) * 2)


def test_multichannel_4d_and_5d_vector_nifti(tmp_path, rng):
    data = rng.random((4, 5, 6, 3)).astype(np.float32)
    nib.save(
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "four.nii"
    )
    volume = read_volume(tmp_path / "four.nii")
    assert volume.array.shape == (4, 5, 6, 3)
    assert volume.spacing == (2.0, 2.0, 3.0)
    np.testing.assert_array_equal(volume.array, data)
    back = nib.load(write_volume(volume, tmp_path / "back.nii.gz"))
    assert back.shape == (4, 5, 6, 3)

    nib.save(
        nib.Nifti1Image(data[:, :, :, None, :], np.eye(4)), tmp_path / "five.nii.gz"
    )
    np.testing.assert_array_equal(read_volume(tmp_path / "five.nii.gz").array, data)


def test_uncompressed_nifti_is_memory_mapped(tmp_path, rng):
    data = rng.random((6, 6, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "m.nii")
    volume = read_volume(tmp_path / "m.nii")
    assert isinstance(volume.array, np.memmap) or isinstance(
        volume.array.base, np.memmap
    )


def test_nan_and_inf_are_read_as_stored(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    array = read_volume(tmp_path / "nan.nii.gz").array
    assert np.isnan(array[0, 0, 0, 0]) and np.isinf(array[1, 1, 1, 0])


def _damaged_voxel_size_nifti(path, rng, first=0.0):
    """A NIfTI without sform/qform whose pixdim says ``first`` mm along the first
    axis (0 or negative: a damaged header)."""
    data = rng.random((4, 5, 6)).astype(np.float32)
    img = nib.Nifti1Image(data, None)
    img.header["pixdim"][1:4] = [first, 2.0, 3.0]
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    return data


@pytest.mark.parametrize(
    "name, first, read_as",
    [("zero.nii.gz", 0.0, 1.0), ("zero.nii", 0.0, 1.0), ("minus.nii.gz", -2.0, 2.0)],
)
def test_a_header_fixed_on_reading_is_named_once_and_kept_with_the_scan(
    name, first, read_as, tmp_path, rng, caplog, capfd
):
    path = tmp_path / name
    data = _damaged_voxel_size_nifti(path, rng, first)
    with caplog.at_level("WARNING"):
        volume = read_volume(path)
    # nibabel reads a zero as 1 mm, a negative size as its absolute value, and says so
    # without naming the file; medseg says it once, naming the file, and the volume
    # keeps the line for reports
    assert volume.spacing == (read_as, 2.0, 3.0)
    np.testing.assert_array_equal(volume.array[..., 0], data)
    assert len(volume.notes) == 2  # the second: no orientation stored (below)
    assert volume.notes[0].startswith(f"{path}: header fixed on reading: pixdim")
    assert "stores no orientation" in volume.notes[1]
    assert [r.getMessage() for r in caplog.records] == list(volume.notes)
    assert {r.name for r in caplog.records} == {"medseg.io.nifti"}  # under medseg.io
    assert "pixdim" not in capfd.readouterr().err  # nibabel's own handler was quiet
    assert volume.with_array(volume.array[..., :1]).notes == volume.notes
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert read_info(path).spacing == (read_as, 2.0, 3.0)
    assert [r.getMessage() for r in caplog.records] == list(volume.notes[:1])
    # a sound header: nothing to say
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "sound.nii.gz")
    caplog.clear()
    assert read_volume(tmp_path / "sound.nii.gz").notes == ()
    assert caplog.records == []


def test_a_scan_that_stores_no_orientation_is_named(tmp_path, rng, caplog):
    # sform and qform codes 0: nibabel places the voxels by their sizes alone, x
    # flipped (LAS); ITK reads the same file as LPS, so its directions are not known
    sitk = pytest.importorskip("SimpleITK")
    data = rng.integers(0, 9, size=(4, 5, 6)).astype(np.int16)
    img = nib.Nifti1Image(data, None)
    img.header.set_zooms((1.0, 2.0, 3.0))
    path = tmp_path / "bare.nii.gz"
    nib.save(img, path)
    header = nib.load(path).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (0, 0)
    with caplog.at_level("WARNING"):
        volume = read_volume(path)
    assert volume.notes == (
        f"{path}: stores no orientation (sform and qform codes 0): placed by its voxel "
        "sizes alone, voxel order LAS as nibabel reads it (ITK-based tools read LPS); "
        "its left-right and front-back are not known",
    )
    assert [r.getMessage() for r in caplog.records] == list(volume.notes)
    np.testing.assert_array_equal(volume.affine, nib.load(path).affine)
    assert nib.aff2axcodes(volume.affine) == ("L", "A", "S")
    direction = np.reshape(sitk.ReadImage(str(path)).GetDirection(), (3, 3))
    np.testing.assert_array_equal(direction, np.eye(3))  # LPS in ITK's frame
    # its label map stores none either, so that both lie alike in any viewer
    labels = volume.with_array((volume.array > 4).astype(np.uint8))
    written = nib.load(write_volume(labels, tmp_path / "labels.nii.gz", is_label=True))
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (
        0,
        0,
    )
    np.testing.assert_array_equal(written.affine, volume.affine)
    # a qform alone (code 1) stores one
    img.set_qform(np.diag([1.0, 2.0, 3.0, 1.0]), code=1)
    nib.save(img, tmp_path / "qform.nii.gz")
    assert read_volume(tmp_path / "qform.nii.gz").notes == ()


def _two_transforms_nifti(path: Path, data, sform, qform) -> Path:
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nib.save(img, path)
    return path


def test_a_scan_whose_sform_and_qform_disagree_is_named_and_its_labels_keep_both(
    tmp_path, rng, caplog
):
    # as SPM's coregistration leaves a scan: the sform moved (here flipped, sheared
    # and shifted: a transform ITK-based tools will not take), the qform the scanner's
    data = rng.integers(0, 500, size=(6, 5, 4)).astype(np.int16)
    qform = np.diag([0.9, 1.1, 1.3, 1.0])
    qform[:3, 3] = [-20.0, 4.0, 7.5]
    sform = np.array(
        [
            [-0.9, 0.2, 0.0, 3.0],
            [0.0, 1.1, 0.0, 4.0],
            [0.1, 0.0, 1.3, 7.0],
            [0, 0, 0, 1],
        ]
    )
    path = _two_transforms_nifti(tmp_path / "moved.nii.gz", data, sform, qform)
    with caplog.at_level("WARNING"):
        volume = read_volume(path)
    header = nib.load(path).header
    stored_s, stored_q = header.get_sform(), header.get_qform()
    apart = max(  # every voxel's centre by one transform and by the other
        np.linalg.norm((stored_s @ [*v, 1.0] - stored_q @ [*v, 1.0])[:3])
        for v in np.ndindex(data.shape)
    )
    assert volume.notes == (
        f"{path}: its sform and qform disagree (voxels up to {apart:.3g} mm apart, "
        "voxel order LAS by the sform and RAS by the qform): read by the sform, as "
        "nibabel and FSL read it; a tool that reads the qform sees the scan elsewhere "
        "(outputs keep both)",
    )
    assert [r.getMessage() for r in caplog.records] == list(volume.notes)
    np.testing.assert_array_equal(volume.affine, stored_s)
    # its label map carries the scan's two transforms as they are, so that a viewer
    # taking either one lays it over the scan
    labels = volume.with_array((volume.array > 250).astype(np.uint8))
    written = nib.load(write_volume(labels, tmp_path / "labels.nii.gz", is_label=True))
    for field in (
        "sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b",
        "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim",
    ):  # fmt: skip
        np.testing.assert_array_equal(written.header[field], header[field], field)
    np.testing.assert_array_equal(written.get_fdata(), volume.array[..., 0] > 250)
    assert written.get_data_dtype() == np.uint8

    # one transform written twice, float32 rounding apart (dcm2niix's, an oblique
    # scan's): nothing to say; nor with the qform unset (code 0)
    from scipy.spatial.transform import Rotation

    oblique = np.eye(4)
    oblique[:3, :3] = Rotation.from_euler(
        "xyz", [17, -31, 52], degrees=True
    ).as_matrix()
    oblique[:3, :3] *= [0.7, 0.7, 3.3]
    oblique[:3, 3] = [90.5, 120.25, -60.0]
    for name, s, q, qcode in [
        ("oblique.nii.gz", oblique, oblique, 1),
        ("almost.nii.gz", qform + np.diag([0, 0, 0.001, 0]), qform, 1),
        ("unset.nii.gz", sform, qform, 0),
    ]:
        img = nib.Nifti1Image(data, None)
        img.set_qform(q, code=qcode)
        img.set_sform(s, code=2)
        nib.save(img, tmp_path / name)
        assert read_volume(tmp_path / name).notes == (), name
    # 0.075 mm apart at the far corner is more than rounding; and a sheared sform
    # (OBLIQUE_LPS) has no qform that equals it
    shifted = _two_transforms_nifti(
        tmp_path / "shifted.nii.gz", data, qform + np.diag([0, 0, 0.025, 0]), qform
    )
    assert "(voxels up to 0.075 mm apart)" in read_volume(shifted).notes[0]
    sheared = _two_transforms_nifti(
        tmp_path / "sheared.nii.gz", data, OBLIQUE_LPS, OBLIQUE_LPS
    )
    assert "its sform and qform disagree" in read_volume(sheared).notes[0]


@pytest.mark.parametrize("unit, mm_per_unit", [("meter", 1000.0), ("micron", 0.001)])
def test_positions_stored_in_metres_or_microns_are_read_in_mm(
    unit, mm_per_unit, tmp_path, rng
):
    from medseg.preprocessing.geometry import resample_to_spacing

    data = rng.integers(0, 500, size=(6, 5, 4)).astype(np.int16)
    in_unit = OBLIQUE_LPS.copy()
    in_unit[:3] /= mm_per_unit  # OBLIQUE_LPS's voxels and positions in that unit
    img = nib.Nifti1Image(data, in_unit)
    img.header.set_xyzt_units(unit, "msec")
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, path)
    stored = nib.load(path).affine  # float32 in the file
    want = np.vstack([stored[:3] * mm_per_unit, [0, 0, 0, 1]])
    volume = read_volume(path)
    np.testing.assert_allclose(volume.affine, want, rtol=1e-12)
    np.testing.assert_allclose(volume.affine, OBLIQUE_LPS, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, np.linalg.norm(want[:3, :3], axis=0))
    np.testing.assert_array_equal(read_info(path).affine, volume.affine)
    assert volume.notes == (
        f"{path}: positions and voxel sizes stored in {unit}s: read in mm "
        f"(x {mm_per_unit:g}), as ITK reads them (nibabel-based tools take them for "
        "mm)",
    )
    # a label map of it keeps its header as it is; read back, the same grid
    labels = volume.with_array((volume.array > 250).astype(np.uint8))
    written = write_volume(labels, tmp_path / "labels.nii.gz", is_label=True)
    back = nib.load(written)
    assert back.header.get_xyzt_units() == (unit, "msec")
    np.testing.assert_array_equal(back.affine, stored)
    np.testing.assert_array_equal(read_volume(written).affine, volume.affine)
    # on another grid the affine written is in mm, and the units say so
    coarse, _ = resample_to_spacing(volume, (1.6, 1.6, 7.0))
    written = write_volume(coarse, tmp_path / "coarse.nii.gz")
    assert nib.load(written).header.get_xyzt_units() == ("mm", "msec")
    np.testing.assert_allclose(nib.load(written).affine, coarse.affine, atol=1e-4)
    assert read_volume(written).notes == ()


def test_header_fixes_of_other_threads_are_left_to_nibabel(tmp_path, rng, caplog):
    import threading

    from medseg.io import nifti

    nibabel_logger = __import__("logging").getLogger("nibabel.global")
    with caplog.at_level("WARNING"), nifti._header_fixes(tmp_path / "a.nii") as lines:
        other = threading.Thread(target=nibabel_logger.warning, args=("elsewhere",))
        other.start()
        other.join()
        nibabel_logger.warning("here")
    assert lines == [f"{tmp_path / 'a.nii'}: header fixed on reading: here"]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("nibabel.global", "elsewhere"),
        ("medseg.io.nifti", lines[0]),
    ]


def test_header_only_info_matches_data(oblique_nifti):
    path, data = oblique_nifti
    info = read_info(path)
    assert info.spatial_shape == data.shape and info.num_channels == 1
    assert info.dtype == np.int16 and info.format == "nifti"
    np.testing.assert_allclose(info.affine, OBLIQUE_LPS, atol=1e-6)


# 2D images


def test_png_greyscale_reads_h_w_1_and_round_trips(tmp_path, rng):
    data = rng.integers(0, 256, size=(17, 23), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "g.png")
    volume = read_volume(tmp_path / "g.png", pixel_spacing_mm=(0.5, 0.25))
    assert volume.array.shape == (17, 23, 1)
    assert volume.spacing == (0.5, 0.25)
    np.testing.assert_array_equal(volume.array[..., 0], data)
    write_volume(volume, tmp_path / "copy.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "copy.png")), data)


def test_png_rgb_reads_h_w_3(tmp_path, rng):
    data = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "rgb.png")
    volume = read_volume(tmp_path / "rgb.png")
    assert volume.array.shape == (8, 9, 3)
    np.testing.assert_array_equal(volume.array, data)


def test_palette_png_reads_indices_not_colours(tmp_path):
    indices = (np.arange(20).reshape(4, 5) % 3).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(tmp_path / "mask.png")
    volume = read_volume(tmp_path / "mask.png")
    assert volume.array.shape == (4, 5, 1)
    np.testing.assert_array_equal(volume.array[..., 0], indices)
    assert volume.notes == ()  # colours: a mask drawn in colours
    # greys other than the indices: named (a mask of 0 and 1 shown black and white,
    # or a greyscale picture saved with a palette, which would be segmented as its
    # indices); greys that are the indices: nothing to say
    for greys, note in [
        ([0, 255, 128], "(0, 1, 2), which it shows as the greys 0, 255, 128: a mask's"),
        ([0, 1, 2], None),
    ]:
        image.putpalette([g for grey in greys for g in (grey,) * 3] + [0] * 759)
        image.save(tmp_path / "grey.png")
        volume = read_volume(tmp_path / "grey.png")
        np.testing.assert_array_equal(volume.array[..., 0], indices)
        if note is None:
            assert volume.notes == ()
        else:
            assert volume.notes == (
                f"{tmp_path / 'grey.png'}: a palette picture, read as its palette "
                f"indices {note} values, but not a scan's intensities (save scans as "
                "greyscale pictures)",
            )


def test_uint16_png_and_float_tiff_round_trip(tmp_path, rng):
    labels = rng.integers(0, 60000, size=(6, 7)).astype(np.uint16)
    volume = Volume(labels[..., None], np.eye(4))
    write_volume(volume, tmp_path / "l.png")
    back = read_volume(tmp_path / "l.png")
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array[..., 0], labels)

    image = rng.random((6, 7)).astype(np.float32)
    write_volume(Volume(image[..., None], np.eye(4)), tmp_path / "f.tif")
    back = read_volume(tmp_path / "f.tif")
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array[..., 0], image)


def test_jpeg_reads_but_is_refused_for_writing(tmp_path):
    Image.fromarray(np.full((5, 5), 100, np.uint8)).save(tmp_path / "a.jpg")
    volume = read_volume(tmp_path / "a.jpg")
    assert volume.array.shape == (5, 5, 1)
    with pytest.raises(InputFileError, match="lossy"):
        write_volume(volume, tmp_path / "b.jpeg")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.jpg"]


def test_float_to_png_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(InputFileError, match="PNG holds only uint8/uint16"):
        write_volume(
            Volume(np.ones((3, 3, 1), np.float32), np.eye(4)), tmp_path / "x.png"
        )
    assert list(tmp_path.iterdir()) == []


def test_multipage_tiff_is_not_a_2d_image(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(InputFileError, match="multi-page"):
        read_volume(tmp_path / "stack.tif")


# NumPy


def test_npy_layouts(tmp_path, rng):
    cube = rng.random((4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "c.npy", cube)
    assert read_volume(tmp_path / "c.npy").array.shape == (4, 5, 6, 1)
    assert read_volume(tmp_path / "c.npy", spatial_dims=2).array.shape == (4, 5, 6)
    np.save(tmp_path / "m.npy", rng.random((4, 5, 6, 2)))
    assert read_volume(tmp_path / "m.npy").array.shape == (4, 5, 6, 2)
    write_volume(Volume(cube[..., None], np.eye(4)), tmp_path / "w.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), cube)


def test_npy_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputFileError, match="pickled"):
        read_volume(tmp_path / "o.npy")


# errors


def _nifti_bytes(tmp_path, shape=(20, 20, 20)):
    path = tmp_path / "good.nii.gz"
    nib.save(
        nib.Nifti1Image(
            np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4)
        ),
        path,
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.nii.gz", b"", "empty file"),
        ("random.nii.gz", bytes(range(256)) * 8, "not gzip-compressed"),
        ("random.nii", bytes(range(256)) * 8, "not a NIfTI file"),
        ("notes.txt", b"hello", "unsupported file type"),
        ("fake.png", b"\x89PNG but not really", "not a readable image"),
    ],
)
def test_unreadable_files_name_the_file_and_the_problem(
    tmp_path, name, content, message
):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message) as info:
        read_volume(path)
    assert str(info.value).startswith(str(path))


def test_gzipped_nifti_named_nii_is_named_as_such(tmp_path):
    path = tmp_path / "scan.nii"
    path.write_bytes(_nifti_bytes(tmp_path))
    with pytest.raises(InputFileError) as info:
        read_volume(path)
    assert str(info.value) == (
        f"{path}: gzip-compressed data in a file not named .gz (name it .nii.gz)"
    )


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize(
    ("field", "row", "problem"),
    [
        (
            "srow_x",
            [np.nan, 0, 0, 0],
            "values that are not numbers (NaN or infinite) in the header's sform",
        ),
        ("srow_x", [np.inf, 0, 0, 0], "values that are not numbers"),
        ("srow_x", [0, 0, 0, 0], "a singular affine from the header's sform"),
        ("srow_y", [1, 0, 0, 0], "a singular affine"),  # two voxel axes alike
        (
            "pixdim",
            np.nan,
            "values that are not numbers (NaN or infinite) in the "
            "header's qform and voxel sizes",
        ),
    ],
)
def test_a_nifti_whose_affine_places_no_scan_is_refused_by_name(
    tmp_path, field, row, problem
):
    # before: a many-line message with the matrix, or an OrientationError from deep
    # in resampling
    header = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)).header
    path = tmp_path / "bad.nii"
    if field == "pixdim":  # nibabel writes no such header: the voxel size patched in
        header.set_sform(None, code=0)
        header.set_qform(np.eye(4), code=1)
        nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None, header), path)
        with open(path, "r+b") as handle:
            handle.seek(80)  # pixdim[1], the first voxel size
            handle.write(np.float32(row).tobytes())
    else:
        header[field] = row
        nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None, header), path)
    for read in (read_volume, read_info):
        with pytest.raises(InputFileError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: degenerate geometry: {problem}")
        assert "\n" not in str(info.value)


def test_truncated_gzip_is_reported_as_truncated(tmp_path):
    whole = _nifti_bytes(tmp_path)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputFileError, match="truncated"):
        read_volume(path)


def test_corrupt_gzip_stream_is_reported(tmp_path):
    whole = bytearray(_nifti_bytes(tmp_path))
    middle = len(whole) // 2
    whole[middle : middle + 64] = bytes(64)  # wipe part of the deflate stream
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(InputFileError, match="corrupt|truncated|unreadable"):
        read_volume(path)


def test_truncated_uncompressed_nifti_names_byte_counts(tmp_path):
    nib.save(
        nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)),
        tmp_path / "a.nii",
    )
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "a.nii").write_bytes(raw[:-100])
    # 352-byte header + 4000 bytes of data = 4352 declared
    with pytest.raises(
        InputFileError, match="header declares 4,352 bytes, file has 4,252"
    ):
        read_volume(tmp_path / "a.nii")


def _header_with_dims(tmp_path, dims):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((2, 2, 2))
    raw = bytearray(header.binaryblock)
    # dim[0..7] are int16 at byte offset 40
    field = np.array([len(dims), *dims, *([1] * (7 - len(dims)))], dtype="<i2")
    raw[40:56] = field.tobytes()
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes(raw) + b"\0" * 4 + b"\0" * 64)
    return path


def test_decompression_bomb_is_refused_before_reading(tmp_path):
    path = _header_with_dims(tmp_path, (30000, 30000, 30000))
    with pytest.raises(InputFileError, match="decompression bomb"):
        read_volume(path)
    with pytest.raises(InputFileError, match="above the limit of 100"):
        read_volume(_header_with_dims(tmp_path, (5, 5, 5)), max_voxels=100)


def test_header_dims_larger_than_data_are_truncation(tmp_path):
    with pytest.raises(InputFileError, match="truncated"):
        read_volume(_header_with_dims(tmp_path, (50, 50, 50)))


def test_zero_size_dimension(tmp_path):
    with pytest.raises(InputFileError, match="zero-size"):
        read_volume(_header_with_dims(tmp_path, (5, 0, 5)))


def test_write_to_missing_folder(tmp_path):
    with pytest.raises(InputFileError, match="output folder does not exist"):
        write_volume(
            Volume(np.zeros((2, 2, 2, 1)), np.eye(4)), tmp_path / "no" / "x.nii"
        )


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def explode(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_text", explode)
    with pytest.raises(InputFileError, match="No space left on device"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# helpers


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 1, 2], np.int64), np.uint8),
        (np.array([0, 300], np.int32), np.uint16),
        (np.array([-1000, 3000], np.int32), np.int16),
        (np.array([0, 70000], np.int64), np.uint32),
        (np.array([True, False]), np.uint8),
        (np.array([0.5], np.float64), np.float32),
        (np.array([0.5], np.float16), np.float32),
    ],
)
def test_output_dtype(values, expected):
    assert output_dtype(values) == expected


def test_suffixes():
    assert split_suffix("a/b/Case_01.NII.GZ") == ("Case_01", ".nii.gz")
    assert split_suffix("x.tar.gz") == ("x.tar.gz", "")
    assert scan_format("x.tiff") == "image2d"
    assert scan_format("x.nii") == "nifti"


def test_volume_rejects_bad_shapes():
    with pytest.raises(ValueError, match="channels-last"):
        Volume(np.zeros((3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="finite 4x4"):
        Volume(np.zeros((3, 3, 1)), np.eye(3))


def test_integer_source_dtype_is_kept_when_it_holds_the_values(oblique_nifti, tmp_path):
    path, data = oblique_nifti  # int16 on disk
    volume = read_volume(path)
    positive = volume.with_array(np.abs(volume.array))  # would fit uint16 too
    assert (
        nib.load(write_volume(positive, tmp_path / "a.nii")).get_data_dtype() == "<i2"
    )
    huge = volume.with_array(volume.array.astype(np.int64) * 100)  # beyond int16
    assert nib.load(write_volume(huge, tmp_path / "b.nii")).get_data_dtype() == "<i4"


def test_a_case_stored_one_file_per_channel_reads_as_one_volume(tmp_path, rng):
    from medseg.io import read_channels

    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    channels = [rng.random((5, 6, 4)).astype(np.float32) for _ in range(3)]
    files = [tmp_path / f"case_{c:04d}.nii.gz" for c in range(3)]
    for path, data in zip(files, channels, strict=True):
        nib.save(nib.Nifti1Image(data, affine), path)
    volume = read_channels(files, 3)
    np.testing.assert_array_equal(volume.array, np.stack(channels, -1))
    np.testing.assert_array_equal(volume.affine, nib.load(files[0]).affine)
    assert volume.path == files[0]
    # a channel missing, or one too many: named with what the model takes
    with pytest.raises(InputFileError) as missing:
        read_channels([files[0], files[2]], 3)
    assert str(missing.value) == (
        f"{files[0]}: channel files _0000, _0002, but the model takes 3 channels, "
        "_0000 to _0002"
    )
    with pytest.raises(InputFileError, match="_0000, _0001, _0002, but the model "):
        read_channels(files, 2)
    # a channel stored in another voxel order is read in the first's
    stored, stored_affine = stored_in_another_order(channels[2], affine, (1, 0, 2), [0])
    nib.save(nib.Nifti1Image(stored, stored_affine), files[2])
    np.testing.assert_array_equal(read_channels(files, 3).array, np.stack(channels, -1))
    # a channel on another grid: named
    nib.save(nib.Nifti1Image(channels[1][:4], affine), files[1])
    with pytest.raises(InputFileError) as shape:
        read_channels(files, 3)
    assert str(shape.value) == (
        f"{files[1]}: shape (4, 6, 4) differs from case_0000.nii.gz's (5, 6, 4)"
    )
    nib.save(nib.Nifti1Image(channels[1], affine @ np.diag([1, 1, 1.01, 1])), files[1])
    with pytest.raises(InputFileError, match="case_0001.nii.gz: affine differs from"):
        read_channels(files, 3)
    nib.save(nib.Nifti1Image(np.stack(channels[:2], -1), affine), files[1])
    with pytest.raises(InputFileError, match="case_0001.nii.gz: 2 channels in one"):
        read_channels(files, 3)


# MetaImage and NRRD (SimpleITK)


def _rigid_oblique() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [17, -31, 52], degrees=True).as_matrix()
    affine[:3, :3] *= [0.7, 0.9, 3.3]
    affine[:3, 3] = [90.5, 120.25, -60.0]
    return affine


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd", ".nhdr"])
def test_metaimage_and_nrrd_read_as_the_nifti_itk_converted_them_from(
    suffix, tmp_path, rng
):
    sitk = pytest.importorskip("SimpleITK")
    # a NIfTI (sform = qform, a rotation: one place for ITK and nibabel alike),
    # converted by ITK itself; nibabel's reading of the NIfTI is the reference
    data = rng.integers(-1000, 2000, size=(9, 7, 5)).astype(np.int16)
    img = nib.Nifti1Image(data, _rigid_oblique())
    img.set_qform(_rigid_oblique(), code=1)
    nib.save(img, tmp_path / "scan.nii.gz")
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")), str(path))
    want = nib.load(tmp_path / "scan.nii.gz").affine
    volume = read_volume(path)
    assert volume.array.shape == (9, 7, 5, 1) and volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[..., 0], data)
    np.testing.assert_allclose(volume.affine, want, atol=1e-5)
    info = read_info(path)
    assert (info.format, info.spatial_shape, info.num_channels) == ("itk", (9, 7, 5), 1)
    assert info.dtype == np.int16
    np.testing.assert_array_equal(info.affine, volume.affine)
    # a label map of it, written as one file, lies where ITK lays the scan
    out = (
        tmp_path
        / f"labels{'.nrrd' if 'nrrd' in suffix or 'nhdr' in suffix else '.mha'}"
    )
    labels = volume.with_array((volume.array > 500).astype(np.uint8))
    write_volume(labels, out, is_label=True, source_id="0123abcd")
    scan, written = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
    for what in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(
            getattr(written, what)(), getattr(scan, what)(), atol=1e-9
        )
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(written), (sitk.GetArrayFromImage(scan) > 500)
    )
    assert sitk.GetArrayFromImage(written).dtype == np.uint8
    assert read_source_id(out) == "0123abcd"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_metaimage_channels_slices_refusals_and_damage(tmp_path, rng, monkeypatch):
    sitk = pytest.importorskip("SimpleITK")
    # channels as vector components; a 2D image as one slice of a volume
    rgb = rng.integers(0, 255, size=(6, 5, 3)).astype(np.uint8)  # (y, x, c)
    picture = sitk.GetImageFromArray(rgb, isVector=True)
    picture.SetSpacing((0.5, 0.25))
    sitk.WriteImage(picture, str(tmp_path / "rgb.mha"))
    volume = read_volume(tmp_path / "rgb.mha")
    assert volume.array.shape == (5, 6, 1, 3)
    np.testing.assert_array_equal(volume.array[:, :, 0, :], rgb.transpose(1, 0, 2))
    np.testing.assert_allclose(volume.affine, np.diag([-0.5, -0.25, 1.0, 1.0]))
    assert read_info(tmp_path / "rgb.mha").num_channels == 3
    with pytest.raises(InputFileError, match=r"rgb\.mha: declares 90 voxels"):
        read_volume(tmp_path / "rgb.mha", max_voxels=89)  # 5 x 6 x 1 x 3
    # written back with its channels, then read as it was
    write_volume(volume, tmp_path / "copy.nrrd")
    again = read_volume(tmp_path / "copy.nrrd")
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.affine, volume.affine)
    # a detached header is read, not written; a sheared affine is kept as it is
    with pytest.raises(InputFileError, match=r"\.mhd keeps its voxels in another"):
        write_volume(volume, tmp_path / "out.mhd")
    for suffix in (".mha", ".nrrd"):
        sheared = Volume(np.ones((3, 4, 5, 1), np.uint8), OBLIQUE_LPS)
        write_volume(sheared, tmp_path / f"sheared{suffix}", is_label=True)
        back = read_volume(tmp_path / f"sheared{suffix}")
        np.testing.assert_allclose(back.affine, OBLIQUE_LPS, atol=1e-12)
    # a NRRD written by hand in RAS space (ITK's is LPS): voxel (i, j, k) at
    # (10 + i, 20 + 2 j, 30 + 3 k), x fastest in the data
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\n"
        "sizes: 4 3 2\nspace directions: (1,0,0) (0,2,0) (0,0,3)\n"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n"
        "space origin: (10,20,30)\n\n"
    )
    values = np.arange(24, dtype="<i2")
    (tmp_path / "ras.nrrd").write_bytes(header.encode() + values.tobytes())
    ras = read_volume(tmp_path / "ras.nrrd")
    want = np.diag([1.0, 2.0, 3.0, 1.0])
    want[:3, 3] = [10, 20, 30]
    np.testing.assert_allclose(ras.affine, want)
    np.testing.assert_array_equal(ras.array[..., 0], values.reshape(2, 3, 4).T)
    # a series of volumes (4D) is no scan
    volumes = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))] * 2
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "series.mha"))
    with pytest.raises(InputFileError, match=r"series\.mha: a 4D image \(expected"):
        read_volume(tmp_path / "series.mha")
    whole = (tmp_path / "copy.nrrd").read_bytes()
    for name, content, problem in [
        ("cut.mha", (tmp_path / "rgb.mha").read_bytes()[:-40], "unreadable (damaged"),
        ("noise.nrrd", bytes(range(256)) * 4, "not a MetaImage or NRRD file"),
        ("half.nrrd", whole[: len(whole) // 2], "unreadable"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputFileError) as info:
            read_volume(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: {problem}"), info.value
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setitem(__import__("sys").modules, "SimpleITK", None)
    with pytest.raises(InputFileError) as info:  # without the itk extra
        read_volume(tmp_path / "rgb.mha")
    assert str(info.value) == (
        f"{tmp_path / 'rgb.mha'}: a MetaImage or NRRD file; reading and writing it "
        'needs SimpleITK (pip install "medseg[itk]")'
    )


def test_a_cut_metaimage_or_nrrd_is_named_in_one_line_with_what_is_missing(
    tmp_path, capfd, rng
):
    # a copy cut short: named with the bytes found and expected, and nothing of
    # ITK's own readers on stderr (MetaIO prints its own lines there when it reads one)
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(rng.random((5, 6, 7), np.float32))  # 840 bytes
    whole = tmp_path / "whole"
    whole.mkdir()
    for name, compressed in [
        ("raw.mha", False), ("gz.mha", True), ("raw.nrrd", False), ("gz.nrrd", True),
        ("cut.mhd", False), ("gone.mhd", False), ("gone.nhdr", False),
    ]:  # fmt: skip
        sitk.WriteImage(image, str(whole / name), useCompression=compressed)
    for name in ("raw.mha", "gz.mha", "raw.nrrd", "gz.nrrd"):
        data = (whole / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-100])
    header = (whole / "cut.mhd").read_text()
    (tmp_path / "cut.mhd").write_text(header)
    (tmp_path / "cut.raw").write_bytes((whole / "cut.raw").read_bytes()[:800])
    (tmp_path / "gone.mhd").write_text((whole / "gone.mhd").read_text())
    (tmp_path / "gone.nhdr").write_text((whole / "gone.nhdr").read_text())
    gz = (whole / "gz.mha").read_text(encoding="latin-1")
    stored = int(gz.split("CompressedDataSize = ")[1].split()[0])
    raw = "unreadable (damaged or truncated: "
    want = {
        "raw.mha": f"{raw}its voxel data is 740 of the 840 bytes its header gives)",
        "gz.mha": f"{raw}its voxel data is {stored - 100:,} of the {stored:,} bytes "
        "its header gives)",
        "raw.nrrd": f"{raw}fread got only 185 4-sized things, not 210 (88.0952% of "
        "expected))",
        "gz.nrrd": f"{raw}expected 840 bytes but received ",
        "cut.mhd": f"{raw}its voxel data is 800 of the 840 bytes its header gives)",
        "gone.mhd": "its voxel data file gone.raw is missing",
        "gone.nhdr": f'unreadable (couldn\'t open "{tmp_path / "gone.raw"}" (data file '
        "1 of 1) for reading)",
    }
    capfd.readouterr()
    for name, problem in want.items():
        with pytest.raises(InputFileError) as info:
            read_volume(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: {problem}"), info.value
        assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""
    for name in want:  # the whole files are read
        assert read_volume(whole / name).array.shape == (7, 6, 5, 1)


def test_a_slicer_segmentation_in_layers_reads_as_one_label_map_unless_they_overlap(
    tmp_path,
):
    pytest.importorskip("SimpleITK")
    from medseg.io.itk import Segment, overlapping_segments, slicer_segments

    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 10.0]
    truth = np.zeros((6, 5, 4), np.uint8)
    truth[1:3, 1:4, 1:3] = 1
    truth[3:5, 1:4, 1:3] = 2
    truth[0, 0, 3] = 3
    # as Slicer saves segments that once overlapped: liver and spleen sharing layer 0,
    # the tumour in layer 1
    layers = np.zeros((6, 5, 4, 2), np.uint8)
    layers[..., 0] = np.where(truth < 3, truth, 0)
    layers[..., 1] = np.where(truth == 3, 3, 0)
    segments = [("liver", 1, 0), ("spleen", 2, 0), ("tumour", 3, 1)]
    path = save_slicer_segmentation(
        tmp_path / "organs.seg.nrrd", layers, segments, affine
    )
    volume = read_volume(path)
    assert volume.array.shape == (6, 5, 4, 1)
    np.testing.assert_array_equal(volume.array[..., 0], truth)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-12)
    assert slicer_segments(volume.header) == [Segment(*s) for s in segments]
    # the tumour drawn inside the liver (2 x 2 voxels): the layers are kept, and say why
    layers[1:3, 1:3, 1, 1] = 3
    overlap = read_volume(
        save_slicer_segmentation(
            tmp_path / "overlap.seg.nrrd", layers, segments, affine
        )
    )
    np.testing.assert_array_equal(overlap.array, layers)
    assert overlapping_segments(np.asarray(overlap.array), overlap.header) == (
        "segments 'liver' and 'tumour' overlap in 4 voxels (saved in 2 layers); a "
        "label map holds one label a voxel"
    )
    # an image of two components that declares no segments is read as two channels
    layers[1:3, 1:3, 1, 1] = 0
    plain = read_volume(save_slicer_segmentation(tmp_path / "two.nrrd", layers, []))
    np.testing.assert_array_equal(plain.array, layers)
    assert slicer_segments(plain.header) == []
    assert overlapping_segments(np.asarray(plain.array), plain.header) is None


def test_a_label_map_that_cannot_be_written_whole_is_named_and_leaves_nothing(
    tmp_path,
):
    # a full disk, simulated by a 2 kB file-size limit in a child process: each
    # format's write fails naming the output (not a temporary file) and leaves no file
    import subprocess
    import sys

    pytest.importorskip("SimpleITK")
    names = [tmp_path / name for name in ("a.mha", "a.nrrd", "a.nii.gz", "a.nii")]
    script = (
        "import resource, signal, sys\n"
        "import numpy as np\n"
        "from medseg.io import Volume, write_volume\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
        "rng = np.random.default_rng(0)\n"
        "labels = rng.integers(0, 3, (40, 40, 40, 1)).astype(np.uint8)\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        write_volume(Volume(labels, np.eye(4)), name, is_label=True)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, names)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.stdout.splitlines() == [
        f"InputFileError {names[0]}: cannot write (ITK's writer failed: File cannot "
        "be written)",
        f"InputFileError {names[1]}: cannot write (ITK's writer failed: Write: Error "
        "writing)",
        f"InputFileError {names[2]}: cannot write (File too large)",
        f"InputFileError {names[3]}: cannot write (File too large)",
    ]
    assert list(tmp_path.iterdir()) == []
