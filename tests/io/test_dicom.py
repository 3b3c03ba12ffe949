from __future__ import annotations

import hashlib
import json
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import InputFileError
from medseg.io import read_info, read_volume
from tests import reference
from tests.conftest import (
    SAMPLE,
    assert_failures_named,
    bundle_record,
    stored_in_another_order,
)
from tests.conftest import run_medseg as medseg

pydicom = pytest.importorskip("pydicom")

#: an oblique orientation (rows run along the first cosine, columns down the second)
OBLIQUE = np.array([0.94, 0.34, 0.0, -0.0, 0.0, -1.0])
OBLIQUE[:3] /= np.linalg.norm(OBLIQUE[:3])


def write_series(
    folder,
    planes,
    *,
    orientation=OBLIQUE,
    origin=(12.5, -40.0, 7.25),
    pixel_spacing=(0.8, 0.6),
    step=2.5,
    slope=1.0,
    intercept=0.0,
    series="1.2.826.0.1.3680043.8.498.1",
    names=None,
    number=None,
    description=None,
    study=None,
    patient=None,
    date=None,
):
    """Writes ``planes`` (``(slices, rows, columns)`` stored values) as a DICOM series
    in ``folder``, slice ``k`` at ``origin + k * step * normal``; the files are named
    in another order than their positions; ``study``: its StudyInstanceUID, also
    given a frame of reference and a patient (else none of them); ``patient``,
    ``date``: a PatientID and StudyDate. Returns the positions."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = []
    order = np.random.default_rng(0).permutation(len(planes))
    for k, plane in enumerate(planes):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        if number is not None:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        if study is not None:
            ds.StudyInstanceUID = study
            ds.FrameOfReferenceUID = study + ".1"
            ds.PatientID, ds.PatientName = "sample", "Sample^Case"
        if patient is not None:
            ds.PatientID = patient
        if date is not None:
            ds.StudyDate = date
        ds.Modality = "MR"
        position = np.asarray(origin, float) + k * step * normal
        positions.append(position)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{step:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
        name = names[k] if names else f"IM{order[k]:04d}"
        ds.save_as(folder / name, enforce_file_format=True)
    return positions


def test_a_series_reads_as_one_volume_where_the_standard_puts_each_pixel(tmp_path):
    rng = np.random.default_rng(3)
    planes = rng.integers(-500, 1500, size=(5, 7, 9)).astype(np.int16)
    folder = tmp_path / "series"
    positions = write_series(folder, planes, slope=2.0, intercept=-1024.0)
    # a media directory beside the slices is no slice
    ds = pydicom.dcmread(next(folder.iterdir()))
    del ds.ImagePositionPatient
    ds.save_as(folder / "DICOMDIR")
    volume = read_volume(folder)
    assert volume.array.shape == (9, 7, 5, 1)  # columns, rows, slices
    assert volume.array.dtype == np.int16
    for k in range(5):  # stored values rescaled, one slice per position, in order
        np.testing.assert_array_equal(
            volume.array[:, :, k, 0], (planes[k].astype(int) * 2 - 1024).T
        )
    for row, column, k in [(0, 0, 0), (6, 8, 4), (3, 2, 1), (6, 0, 3)]:
        lps = reference.dicom_pixel_lps(positions[k], OBLIQUE, (0.8, 0.6), row, column)
        ras = volume.affine @ [column, row, k, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
    info = read_info(folder)
    assert info.spatial_shape == (9, 7, 5) and info.format == "dicom"
    np.testing.assert_allclose(info.affine, volume.affine)
    np.testing.assert_allclose(volume.spacing, (0.6, 0.8, 2.5), atol=1e-5)
    with pytest.raises(InputFileError, match=r"declares 315 voxels .* above the limit"):
        read_volume(folder, max_voxels=300)


def _shift_slices(folder, origin, step, normal, shift) -> None:
    """Moves slice ``k`` of a :func:`write_series` series by ``shift(k)`` (LPS mm)."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        k = round(float((position - origin) @ normal) / step)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position + shift(k)]
        ds.save_as(path)


def test_a_tilted_gantry_series_reads_sheared_and_a_bent_one_is_refused(tmp_path):
    # a CT under a tilted gantry: each slice also moves within its plane, so the
    # volume's slice axis is not its normal; every pixel where the standard puts it
    rng = np.random.default_rng(4)
    planes = rng.integers(-500, 1500, size=(6, 7, 9)).astype(np.int16)
    origin = np.array((12.5, -40.0, 7.25))
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    tilt = 2.5 * np.tan(np.radians(20)) * OBLIQUE[3:]  # along the columns, 20 degrees
    folder = tmp_path / "tilted"
    write_series(folder, planes, origin=origin)
    _shift_slices(folder, origin, 2.5, normal, lambda k: k * tilt)
    volume = read_volume(folder)
    for k in range(6):
        np.testing.assert_array_equal(volume.array[:, :, k, 0], planes[k].T)
        position = origin + k * 2.5 * normal + k * tilt
        for row, column in [(0, 0), (6, 8), (3, 2)]:
            lps = reference.dicom_pixel_lps(position, OBLIQUE, (0.8, 0.6), row, column)
            ras = volume.affine @ [column, row, k, 1]
            np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
    # one slice moved within its plane (two stacks in one series, say): no line
    # through the slices places every pixel, so none is guessed
    bent = tmp_path / "bent"
    write_series(bent, planes, origin=origin, names=[f"s{k}" for k in range(6)])
    _shift_slices(bent, origin, 2.5, normal, lambda k: (k == 3) * 5.0 * OBLIQUE[:3])
    with pytest.raises(InputFileError) as info:
        read_volume(bent)
    assert str(info.value) == (
        f"{bent}: slice positions are not on one line (s3 lies 5 mm off the line "
        "from the first slice to the last): not one volume"
    )


def test_a_rescale_to_fractions_reads_as_float32(tmp_path):
    planes = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    write_series(tmp_path / "s", planes, slope=0.5)
    volume = read_volume(tmp_path / "s")
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[..., 0, 0], planes[0].T * 0.5)


def test_series_that_are_not_one_volume_are_refused_by_name(tmp_path, monkeypatch):
    planes = np.zeros((4, 3, 3), np.int16)
    gap = tmp_path / "gap"
    write_series(gap, planes, names=["a", "b", "c", "d"])
    (gap / "c").unlink()  # slices 0, 1, 3
    two = tmp_path / "two"
    write_series(two, planes[:2], names=["a", "b"])
    write_series(two, planes[:1], names=["c"], series="1.2.3", origin=(0, 0, 0))
    again = tmp_path / "again"
    write_series(again, planes[:2], names=["a", "b"])
    write_series(again, planes[:1], names=["c"])  # slice 0 twice
    cases = [
        (gap, "slices unevenly spaced (2.5 to 5 mm apart; a slice missing?)"),
        (
            two,
            "holds 2 DICOM series (UID 1.2.3: 1 file; UID "
            "1.2.826.0.1.3680043.8.498.1: 2 files); give each series a folder of "
            "its own (medseg data sort-dicom does)",
        ),
        (again, "two slices at one position (a, c)"),
    ]
    for folder, problem in cases:
        with pytest.raises(InputFileError) as info:
            read_volume(folder)
        assert str(info.value) == f"{folder}: {problem}"
    bare = tmp_path / "bare"
    write_series(bare, planes[:2], names=["a", "b"])
    ds = pydicom.dcmread(bare / "b")
    del ds.ImagePositionPatient
    ds.save_as(bare / "b")
    with pytest.raises(InputFileError) as info:
        read_volume(bare)
    assert str(info.value).startswith(f"{bare / 'b'}: no ImagePositionPatient")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InputFileError) as info:
        read_volume(gap)
    assert str(info.value) == (
        f"{gap}: a DICOM series; reading DICOM needs pydicom "
        '(pip install "medseg[dicom]")'
    )


def series_of_nifti(folder, scan, **options):
    """Writes the NIfTI ``scan`` (axes along RAS's negated L and P, and S) as a DICOM
    series of the same voxels and geometry in ``folder``; returns its int16 data and
    its nibabel image."""
    source = nib.load(scan)
    data = np.round(np.asanyarray(source.dataobj)).astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ source.affine
    orientation = np.concatenate([lps[:3, 0], lps[:3, 1]])  # columns along axis 0
    write_series(
        folder,
        data.transpose(2, 1, 0),  # slice k holds rows (axis 1) by columns (axis 0)
        orientation=orientation,
        origin=lps[:3, 3],
        pixel_spacing=(lps[1, 1] * -1, lps[0, 0] * -1),
        step=lps[2, 2],
        **options,
    )
    return data, source


@pytest.mark.slow
def test_predict_segments_a_dicom_series_as_the_same_scan_in_nifti(bundle, tmp_path):
    inputs = tmp_path / "in"
    data, source = series_of_nifti(
        inputs / "subject_1", sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    )
    nib.save(nib.Nifti1Image(data, source.affine), inputs / "subject_2.nii.gz")
    (inputs / "broken").mkdir()
    (inputs / "broken" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 50)
    out = tmp_path / "out"
    result = medseg(
        "predict", "--model", bundle, "--input", f"{inputs}/*", "--output", out,
        "--probabilities",
    )  # fmt: skip
    assert result.returncode == 1
    assert "2 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    assert_failures_named(
        result.stderr,
        inputs / "broken",
        [("x.dcm", "no ImagePositionPatient, ImageOrientationPatient, PixelSpacing")],
    )
    series, nifti = (
        nib.load(out / "subject_1.nii.gz"),
        nib.load(out / "subject_2.nii.gz"),
    )
    assert series.shape == data.shape
    np.testing.assert_allclose(series.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(
        np.asanyarray(series.dataobj), np.asanyarray(nifti.dataobj)
    )
    # the network's output itself, not only the labels (which a barely trained
    # network may leave all background)
    chances = [
        np.load(out / f"subject_{i}_probabilities.npz")["probabilities"] for i in (1, 2)
    ]
    np.testing.assert_array_equal(chances[0], chances[1])
    assert chances[0].shape == (*data.shape, 3) and chances[0][..., 1].std() > 0
    # the series' label map keeps its files' content, whatever their order: a re-run
    # skips it
    from medseg.inference.jobs.inputs import source_id
    from medseg.io import read_source_id

    files = tuple(sorted((inputs / "subject_1").iterdir(), reverse=True))
    assert read_source_id(out / "subject_1.nii.gz") == source_id(files, ordered=False)
    (inputs / "subject_1" / "notes.txt").write_text("not a slice: not its content")
    again = medseg(
        "predict", "--model", bundle, "--input", f"{inputs}/*", "--output", out,
        "--probabilities",
    )  # fmt: skip
    assert "0 segmented, 2 skipped (output existed), 1 failed" in again.stdout
    # one slice's file names its series
    one = next((inputs / "subject_1").iterdir())
    alone = medseg(
        "predict", "--model", bundle, "--input", one, "--output", tmp_path / "o"
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "o" / "subject_1.nii.gz").dataobj),
        np.asanyarray(series.dataobj),
    )
    # a series given with an output file name is written there
    named = tmp_path / "named.nii.gz"
    to_file = medseg(
        "predict", "--model", bundle, "--input", inputs / "subject_1", "--output", named
    )
    assert to_file.returncode == 0, to_file.stderr[-2000:]
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(named).dataobj), np.asanyarray(series.dataobj)
    )
    # the output folder among a series' slices is refused before anything is written
    inside = inputs / "subject_1" / "labels"
    refused = medseg(
        "predict",
        "--model",
        bundle,
        "--input",
        inputs / "subject_1",
        "--output",
        inside,
    )
    assert refused.returncode == 2 and not inside.exists()
    assert refused.stderr.strip() == (
        f"Error: {inputs / 'subject_1'}: a DICOM series given as input, and the output "
        "folder would put files among its slices; choose another output folder"
    )


def _segments_by_slice(path):
    """A DICOM SEG read with pydicom alone: ``{(referenced SOPInstanceUID, segment
    number): frame}`` and the segments' ``{number: (label, property type code)}``."""
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    found = {}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        found[source.ReferencedSOPInstanceUID, int(number)] = frame
    segments = {
        int(s.SegmentNumber): (
            s.SegmentLabel,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
        for s in seg.SegmentSequence
    }
    return seg, found, segments


def _planes_by_slice(series, labels, affine, numbers):
    """What each slice's SEG frames should be: ``{(SOPInstanceUID, segment number):
    the label map's plane at that slice's position}`` (rows by columns), for a
    label map ``(columns, rows, slices)`` whose value is its segment number."""
    to_voxels = np.linalg.inv(affine)
    expected = {}
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ras = np.array([-1.0, -1.0, 1.0]) * [float(v) for v in ds.ImagePositionPatient]
        i, j, k = np.round(to_voxels[:3, :3] @ ras + to_voxels[:3, 3]).astype(int)
        assert i == j == 0
        for number in numbers:
            plane = (labels[:, :, k] == number).T  # rows by columns
            if plane.any():
                expected[ds.SOPInstanceUID, number] = plane
    return expected


@pytest.mark.slow
def test_predict_writes_a_dicom_seg_of_each_series_frame_by_slice(tmp_path):
    pytest.importorskip("highdicom")
    inputs, out = tmp_path / "in", tmp_path / "out"
    scans = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))
    series_of_nifti(inputs / "subject_1", scans[0], study="1.2.826.0.1.3680043.8.7")
    series_of_nifti(inputs / "no_study", scans[1])  # a SEG could not refer to it
    result = medseg(
        "predict", "--model", "hippocampus", "--input", inputs, "--output", out,
        "--dicom-seg",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 segmented, 0 skipped (output existed), 1 failed" in result.stdout
    assert (
        f"FAILED {inputs / 'no_study'}: no StudyInstanceUID, FrameOfReferenceUID: a "
        "DICOM SEG cannot refer to this series" in result.stderr
    )
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("s", "n"))) == [
        "subject_1.nii.gz",
        "subject_1_seg.dcm",
    ]
    labels = nib.load(out / "subject_1.nii.gz")
    array = np.asanyarray(labels.dataobj)
    seg, found, segments = _segments_by_slice(out / "subject_1_seg.dcm")
    assert segments == {1: ("Anterior", "1"), 2: ("Posterior", "2")}
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    first = pydicom.dcmread(next((inputs / "subject_1").iterdir()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    expected = _planes_by_slice(inputs / "subject_1", array, labels.affine, (1, 2))
    assert len(expected) > 10 and sorted(found) == sorted(expected)
    for key, plane in expected.items():
        np.testing.assert_array_equal(found[key], plane)
    # a re-run skips it; a SEG missing (a run without --dicom-seg made the label map)
    # is made again
    (out / "subject_1_seg.dcm").unlink()
    again = medseg(
        "predict", "--model", "hippocampus", "--input", inputs / "subject_1",
        "--output", out, "--dicom-seg",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 segmented, 0 skipped" in again.stdout
    assert sorted(_segments_by_slice(out / "subject_1_seg.dcm")[1]) == sorted(expected)
    # inputs that are not series are refused before any is read
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    (nifti / "scan.nii.gz").symlink_to(scans[0])
    refused = medseg(
        "predict", "--model", "hippocampus", "--input", nifti, "--output",
        tmp_path / "o", "--dicom-seg",
    )  # fmt: skip
    assert refused.returncode == 2 and not (tmp_path / "o").exists()
    assert refused.stderr.strip() == (
        f"Error: {nifti / 'scan.nii.gz'}: not a DICOM series, and --dicom-seg writes a "
        "DICOM SEG of each input series; segment other scans in a run without it"
    )


def test_nifti_to_seg_writes_a_label_map_as_its_series_seg_and_reads_back(tmp_path):
    pytest.importorskip("highdicom")
    from click.testing import CliRunner

    from medseg.io.dicom_seg import read_segmentation
    from medseg_cli.main import main

    name = sorted((SAMPLE / "labelsTr").glob("*.nii.gz"))[2].name
    series = tmp_path / "series"
    series_of_nifti(series, SAMPLE / "imagesTr" / name, study="1.2.826.0.1.3680043.8.9")
    truth = nib.load(SAMPLE / "labelsTr" / name)
    array = np.asanyarray(truth.dataobj)
    # the labels as a viewer saved them over a conversion in another voxel order
    stored, affine = stored_in_another_order(array, truth.affine, (2, 0, 1), [0])
    (tmp_path / "labels").mkdir()
    labels = tmp_path / "labels" / name
    nib.save(nib.Nifti1Image(stored, affine), labels)

    def convert(*options):
        return CliRunner().invoke(
            main,
            ["data", "nifti-to-seg", str(labels), str(series), *map(str, options)],
        )

    out = tmp_path / "labels.dcm"
    result = convert(out, "--label-names", SAMPLE / "dataset.json")
    assert result.exit_code == 0, result.output
    counts = [int((array == v).sum()) for v in (1, 2)]
    assert result.output.strip() == (
        f"{out}: 2 segments of {series}: 1 Anterior {counts[0]:,} voxels, "
        f"2 Posterior {counts[1]:,} voxels"
    )
    seg, found, segments = _segments_by_slice(out)
    assert segments == {1: ("Anterior", "1"), 2: ("Posterior", "2")}
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["MANUAL"] * 2
    expected = _planes_by_slice(series, array, truth.affine, (1, 2))
    assert len(expected) > 10 and sorted(found) == sorted(expected)
    for key, plane in expected.items():
        np.testing.assert_array_equal(found[key], plane)
    back = read_segmentation(out, series)  # what seg-to-nifti writes
    np.testing.assert_array_equal(back.labels, array)
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-4)
    # a model's labels, no names at hand
    result = convert(tmp_path / "auto.dcm", "--algorithm", "hippocampus")
    assert result.exit_code == 0, result.output
    seg, _, segments = _segments_by_slice(tmp_path / "auto.dcm")
    assert segments == {1: ("label 1", "1"), 2: ("label 2", "2")}
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "hippocampus"
    # refused by name, nothing written: another grid, no label, not .dcm
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 1]
    nib.save(nib.Nifti1Image(stored, shifted), labels)
    result = convert(tmp_path / "off.dcm")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: {labels}: not on the grid of the series {series}: shape "
        f"{stored.shape} differs from the series' {array.shape}"
    )
    nib.save(nib.Nifti1Image(np.zeros_like(array), truth.affine), labels)
    result = convert(tmp_path / "empty.dcm")
    assert result.output.strip() == (
        f"Error: {labels}: no voxel labelled: a DICOM SEG needs a segment"
    )
    result = convert(tmp_path / "labels.nii.gz")
    assert result.exit_code == 2
    assert "a DICOM SEG is written as a .dcm file" in result.output
    result = convert(tmp_path / "nowhere" / "x.dcm")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: {tmp_path / 'nowhere'}: output folder does not exist"
    )
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == ["auto.dcm", "labels.dcm"]


def _enhanced(classic, folder):
    """The series in ``classic`` as one Legacy Converted Enhanced MR Image (highdicom's
    converter) in ``folder``: every slice a frame, its geometry and rescaling in the
    functional groups."""
    import highdicom as hd

    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=[pydicom.dcmread(p) for p in sorted(classic.iterdir())],
        series_instance_uid=hd.UID(),
        series_number=5,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    folder.mkdir()
    image.save_as(folder / "mr.dcm")
    return folder / "mr.dcm"


def test_an_enhanced_multiframe_image_reads_as_its_series_and_takes_a_seg(tmp_path):
    pytest.importorskip("highdicom")
    from medseg.io.dicom_seg import read_segmentation, write_segmentation

    planes = np.random.default_rng(2).integers(-100, 900, (6, 7, 9)).astype(np.int16)
    classic = tmp_path / "classic"
    write_series(classic, planes, slope=2.0, intercept=-50.0, study="1.2.826.0.1.3")
    enhanced = _enhanced(classic, tmp_path / "enhanced")
    source = pydicom.dcmread(enhanced)
    assert int(source.NumberOfFrames) == 6 and "ImagePositionPatient" not in source
    want, got = read_volume(classic), read_volume(enhanced.parent)
    assert got.array.dtype == want.array.dtype == np.int16
    np.testing.assert_array_equal(got.array, want.array)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
    assert read_info(enhanced.parent).spatial_shape == (9, 7, 6)
    # its label map as a SEG: each frame refers to the source frame at its position
    labels = np.zeros((9, 7, 6), np.uint8)
    labels[2:7, 1:5, 1:5] = 1
    labels[3:5, 5:7, 2] = 2
    out = tmp_path / "seg.dcm"
    write_segmentation(enhanced.parent, labels, [(1, "a"), (2, "b")], out,
                       algorithm=None, version="1")  # fmt: skip
    seg = pydicom.dcmread(out)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    where = {  # a source frame's number -> its position
        n: [float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]
        for n, g in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)
    }
    to_voxels = np.linalg.inv(got.affine)
    seen = 0
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        lps = where[int(ref.ReferencedFrameNumber)]
        np.testing.assert_allclose(
            [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
            lps,
            atol=1e-4,
        )
        ras = np.array([-1.0, -1.0, 1.0]) * lps
        k = int(np.round(to_voxels[:3, :3] @ ras + to_voxels[:3, 3])[2])
        value = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame, (labels[:, :, k] == value).T)
        seen += 1
    assert seen == 4 + 1  # slices 1-4 hold label 1, slice 2 label 2 too
    back = read_segmentation(out, enhanced.parent)
    np.testing.assert_array_equal(back.labels, labels)
    # a SEG is no scan; a frame without a position is named
    (tmp_path / "segs").mkdir()
    out.rename(tmp_path / "segs" / "seg.dcm")
    with pytest.raises(InputFileError, match="a DICOM Segmentation, not a scan's"):
        read_volume(tmp_path / "segs")
    del source.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    source.save_as(enhanced)
    with pytest.raises(InputFileError) as missing:
        read_volume(enhanced.parent)
    assert str(missing.value).startswith(
        f"{enhanced}: mr.dcm frame 4: no ImagePositionPatient: not a slice"
    )


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_a_dicom_seg_of_a_real_scanners_slice(name, tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    from medseg.io.dicom import read_series
    from medseg.io.dicom_seg import write_segmentation

    pytest.importorskip("highdicom")
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(get_testdata_file(name), folder / name)
    volume, _ = read_series(folder, max_voxels=10**8)
    labels = (volume > np.percentile(volume, 70)).astype(np.uint8)
    labels[:8] = 2  # a second label in the first columns
    write_segmentation(
        folder,
        labels,
        [(1, "bright"), (2, "edge")],
        tmp_path / "seg.dcm",
        algorithm="test",
        version="0",
    )
    seg, found, segments = _segments_by_slice(tmp_path / "seg.dcm")
    source = pydicom.dcmread(folder / name)
    assert segments == {1: ("bright", "1"), 2: ("edge", "2")}
    assert seg.PatientName == source.PatientName
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    for number in (1, 2):
        frame = found[source.SOPInstanceUID, number]
        np.testing.assert_array_equal(frame, (labels[:, :, 0] == number).T)


def _highdicom_seg(folder, planes, kind, path, segments=None):
    """A SEG of the series in ``folder`` made by highdicom alone: ``planes``
    ``(slices in position order, rows, columns, segments)`` (a label map's: without
    the last axis, of ``segments`` segments), segment numbers as label values (no
    medseg codes)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = []
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        for tag in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
            setattr(ds, tag, "")
        for tag in ("ReferringPhysicianName", "StudyID", "AccessionNumber"):
            setattr(ds, tag, "")
        sources.append(ds)
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    sources.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"structure {number}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number in range(1, (segments or planes.shape[-1]) + 1)
    ]
    hd.seg.Segmentation(
        source_images=sources,
        pixel_array=planes,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="a viewer",
        manufacturer_model_name="manual",
        software_versions="1",
        device_serial_number="1",
        max_fractional_value=100,
    ).save_as(path)


def test_a_dicom_seg_reads_back_as_the_label_map_it_was_written_from(tmp_path, rng):
    pytest.importorskip("highdicom")
    from medseg.io.dicom import read_series
    from medseg.io.dicom_seg import read_segmentation, write_segmentation
    from medseg_cli.main import main

    folder = tmp_path / "series"
    write_series(folder, rng.integers(0, 500, (6, 9, 11)), study="1.2.826.0.1.3.4")
    _, affine = read_series(folder, max_voxels=10**6)
    labels = rng.choice(np.array([0, 3, 7], np.uint8), (11, 9, 6), p=[0.6, 0.3, 0.1])
    labels[:, :, 2] = 0  # a slice without labels: its frames are left out
    write_segmentation(
        folder, labels, [(3, "three"), (7, "seven")], tmp_path / "seg.dcm",
        algorithm="test", version="0",
    )  # fmt: skip
    read = read_segmentation(tmp_path / "seg.dcm", folder)
    np.testing.assert_array_equal(read.labels, labels)
    np.testing.assert_array_equal(read.affine, affine)
    assert read.segments == [
        (3, "three", int((labels == 3).sum())),
        (7, "seven", int((labels == 7).sum())),
    ]
    from click.testing import CliRunner

    out = tmp_path / "labels.nii.gz"
    result = CliRunner().invoke(
        main, ["data", "seg-to-nifti", str(tmp_path / "seg.dcm"), str(folder), str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"{out}: 2 segments on {folder}'s grid (11 x 9 x 6)"
    )
    written = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    # a viewer's SEG: fractional, segment numbers as values, from one half up
    fractions = rng.random((6, 9, 11, 2)) * np.array([1.0, 0.0])  # segment 2 empty
    fractions[:, :, :, 1] = (fractions[:, :, :, 0] < 0.3) * 0.8
    _highdicom_seg(folder, fractions, "FRACTIONAL", tmp_path / "viewer.dcm")
    read = read_segmentation(tmp_path / "viewer.dcm", folder)
    stored = np.round(fractions * 100) / 100  # as the SEG keeps them, in hundredths
    expected = np.where(stored[..., 1] >= 0.5, 2, np.where(stored[..., 0] >= 0.5, 1, 0))
    np.testing.assert_array_equal(read.labels, expected.transpose(2, 1, 0))
    assert [s[:2] for s in read.segments] == [(1, "structure 1"), (2, "structure 2")]
    # a label map SEG: one frame a slice, holding every segment's number
    numbers = rng.choice(np.array([0, 1, 2], np.uint8), (6, 9, 11))
    _highdicom_seg(folder, numbers, "LABELMAP", tmp_path / "map.dcm", segments=2)
    read = read_segmentation(tmp_path / "map.dcm", folder)
    np.testing.assert_array_equal(read.labels, numbers.transpose(2, 1, 0))
    # overlapping segments, a SEG of another series, and a slice are refused
    both = np.zeros((6, 9, 11, 2), bool)
    both[1, 2, 3] = True
    _highdicom_seg(folder, both, "BINARY", tmp_path / "overlap.dcm")
    other = tmp_path / "other"
    write_series(other, np.zeros((6, 9, 11)), study="1.2.826.0.1.3.4", series="1.2.3")
    broken = pydicom.dcmread(tmp_path / "seg.dcm")
    del broken.SegmentSequence[0].SegmentNumber
    broken.save_as(tmp_path / "broken.dcm")
    for seg, series, problem in (
        (
            "overlap.dcm",
            folder,
            "segments 1 and 2 overlap (slice 2); a label map holds one label a voxel",
        ),
        (
            "seg.dcm",
            other,
            f"refers to series 1.2.826.0.1.3680043.8.498.1, not {other}'s",
        ),
        (next(folder.iterdir()), folder, "not a DICOM Segmentation object (SEG)"),
        (
            "broken.dcm",
            folder,
            "a malformed DICOM SEG (AttributeError: 'Dataset' object has no "
            "attribute 'SegmentNumber')",
        ),
    ):
        with pytest.raises(InputFileError) as info:
            read_segmentation(tmp_path / seg, series)
        assert str(info.value) == f"{tmp_path / seg}: {problem}"


def test_dicom_seg_and_seg_nrrd_are_refused_without_their_package_or_for_a_classifier(
    tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from medseg_cli.main import main

    def run(model):
        return CliRunner().invoke(
            main,
            ["predict", "--model", str(model), "--input", str(tmp_path)]
            + ["--output", str(tmp_path / "o"), "--dicom-seg"],
        )

    (tmp_path / "cls").mkdir()
    record = bundle_record(task="classification")
    (tmp_path / "cls" / "medseg.json").write_text(json.dumps(record))
    refused = run(tmp_path / "cls")
    assert refused.exit_code == 2
    assert (
        "--dicom-seg, --preview, --seg-nrrd, --masks and --uncertainty are of label "
        "maps; this is a classifier"
    ) in refused.output
    monkeypatch.setitem(sys.modules, "highdicom", None)  # not installed
    refused = run("hippocampus")
    assert refused.exit_code == 2 and not (tmp_path / "o").exists()
    assert '--dicom-seg needs highdicom: pip install "medseg[dicom]"' in refused.output
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # nor SimpleITK
    refused = CliRunner().invoke(
        main,
        ["predict", "--model", "hippocampus", "--input", str(tmp_path)]
        + ["--output", str(tmp_path / "o"), "--seg-nrrd"],
    )
    assert refused.exit_code == 2 and not (tmp_path / "o").exists()
    assert '--seg-nrrd needs SimpleITK: pip install "medseg[itk]"' in refused.output


def test_a_dataset_of_dicom_series_trains_as_its_nifti_copy(tmp_path):
    """Images as series folders (``images/CASE/`` beside ``labels/CASE.nii.gz``, or
    named in a manifest): checked, fingerprinted and preprocessed as the same scans in
    NIfTI are; a slice changed changes the case's cache key."""
    import json
    import os
    import shutil

    from medseg.datasets.checks import check_dataset
    from medseg.datasets.layouts import load_dataset
    from medseg.preprocessing import Preprocessor, ZScoreNormalization
    from medseg.training.data import _cache_key, prepare_case

    names = [p.name[:-7] for p in sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[:2]]
    dicom, nifti = tmp_path / "dicom", tmp_path / "nifti"
    for name in names:
        series_of_nifti(dicom / "images" / name, SAMPLE / "imagesTr" / f"{name}.nii.gz")
        for root in (dicom, nifti):
            (root / "labels").mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE / "labelsTr" / f"{name}.nii.gz", root / "labels")
        (nifti / "images").mkdir(exist_ok=True)  # the same voxels, int16, in NIfTI
        source = nib.load(SAMPLE / "imagesTr" / f"{name}.nii.gz")
        data = np.round(np.asanyarray(source.dataobj)).astype(np.int16)
        nib.save(
            nib.Nifti1Image(data, source.affine), nifti / "images" / f"{name}.nii.gz"
        )
    (dicom / "images" / "notes.txt").write_text("not a scan")
    datasets = [load_dataset(root) for root in (dicom, nifti)]
    assert [c.case_id for c in datasets[0].cases] == names
    assert [c.images for c in datasets[0].cases] == [
        (dicom / "images" / name,) for name in names
    ]
    reports = [check_dataset(d) for d in datasets]
    assert reports[0].problems == [] and reports[1].problems == []
    assert reports[0].fingerprint["spacing_mm"] == reports[1].fingerprint["spacing_mm"]
    pre = Preprocessor((ZScoreNormalization(),), target_spacing_mm=(1.0, 1.0, 1.0))
    for series_case, nifti_case in zip(
        datasets[0].cases, datasets[1].cases, strict=True
    ):
        got = prepare_case(series_case, pre, [0, 1, 2], tmp_path / "cache")
        want = prepare_case(nifti_case, pre, [0, 1, 2], None)
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.label, want.label)
    # in a manifest too; and a slice written again is another cache entry
    (dicom / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [
                    {"image": f"./images/{n}", "label": f"./labels/{n}.nii.gz"}
                    for n in names
                ],
            }
        )
    )
    case = load_dataset(dicom).cases[0]
    assert case.images == (dicom / "images" / names[0],)
    before = _cache_key(pre, case, [0, 1, 2])
    first = next((dicom / "images" / names[0]).iterdir())
    os.utime(first, ns=(1, 1))
    assert _cache_key(pre, case, [0, 1, 2]) != before


def test_a_folder_of_series_folders_holds_one_scan_per_series(tmp_path):
    from medseg.inference.jobs import inputs as job_inputs
    from medseg.inference.jobs import outputs as job_outputs

    patients = tmp_path / "patients"
    planes = np.zeros((2, 3, 3), np.int16)
    for name in ("p2", "p1"):
        write_series(patients / name, planes)
    (patients / "notes").mkdir()
    (patients / "notes" / "readme.txt").write_text("not a scan")
    assert job_inputs.collect_inputs(patients) == [patients / "p1", patients / "p2"]
    assert job_inputs.collect_inputs(patients / "p1") == [patients / "p1"]
    assert job_outputs.output_for(patients / "p1", tmp_path) == tmp_path / "p1.nii.gz"


def test_a_studys_mixed_files_are_sorted_into_one_folder_per_series(tmp_path, rng):
    from medseg.io.dicom import series_folder_name, sort_series

    study = tmp_path / "export"
    planes = {
        uid: rng.integers(-50, 900, (n, 6, 5)).astype(np.int16)
        for uid, n in (("1.2.3.1", 4), ("1.2.3.2", 3), ("1.2.3.3", 2))
    }
    details = {  # two series of one name, as a repeated acquisition
        "1.2.3.1": (3, "t1 mprage/sag"),
        "1.2.3.2": (7, "FLAIR"),
        "1.2.3.3": (7, "FLAIR"),
    }
    for uid, data in planes.items():  # every file in one folder, or one below it
        number, description = details[uid]
        write_series(
            study / ("deeper" if uid.endswith("3") else ""),
            data,
            series=uid,
            number=number,
            description=description,
            names=[f"{uid}_{k}" for k in range(len(data))],
        )
    (study / "README.txt").write_text("not a scan")
    (study / ".hidden").mkdir()
    (study / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    expected = {"0003_t1_mprage_sag": "1.2.3.1"}
    for uid in ("1.2.3.2", "1.2.3.3"):
        expected[f"0007_FLAIR_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"] = uid
    out = tmp_path / "series"
    done = sort_series(study, out)
    assert done.series == {name: len(planes[uid]) for name, uid in expected.items()}
    assert (done.placed, done.present, done.not_dicom, done.problems) == (9, 0, 1, [])
    for name, uid in expected.items():  # each folder reads as its series
        volume = read_volume(out / name)
        np.testing.assert_array_equal(
            volume.array[..., 0], planes[uid].transpose(2, 1, 0)
        )
        direct = tmp_path / "direct" / uid
        write_series(direct, planes[uid], series=uid)
        np.testing.assert_allclose(volume.affine, read_volume(direct).affine)
    assert sorted(p.name for p in (study / "deeper").iterdir()) == [
        "1.2.3.3_0",
        "1.2.3.3_1",
    ]  # the source is left as it was
    again = sort_series(study, out)  # a re-run places nothing twice
    assert (again.placed, again.present, again.problems) == (0, 9, [])
    with pytest.raises(InputFileError, match="inside the folder being sorted"):
        sort_series(study, study / "sorted")
    assert series_folder_name(None, "", "1.2") == (
        "series_" + hashlib.sha1(b"1.2").hexdigest()[:8]
    )
    assert series_folder_name("12", None, "1.2") == "0012"
    # from the command line; a file of the same instance with other bytes is named
    some = next((out / "0003_t1_mprage_sag").iterdir())
    some.unlink()
    some.write_bytes(b"other")
    result = medseg("data", "sort-dicom", study, out)
    assert result.returncode == 1
    assert "3 series; 0 files placed, 8 already there, 1 not DICOM (left), 1 not " in (
        result.stdout
    )
    assert f"{some} exists with other bytes" in result.stderr
    assert f"{out / '0003_t1_mprage_sag'}: 4 files" in result.stdout
    # a later export adds a series of a name already given: the first keeps it
    later = tmp_path / "later"
    write_series(later, planes["1.2.3.1"], series="1.2.3.1", number=3,
                 description="t1 mprage/sag", names=["a", "b", "c", "d"])  # fmt: skip
    write_series(later / "x", planes["1.2.3.2"], series="1.2.3.4", number=3,
                 description="t1 mprage/sag")  # fmt: skip
    more = sort_series(later, out)
    added = "0003_t1_mprage_sag_" + hashlib.sha1(b"1.2.3.4").hexdigest()[:8]
    assert more.series == {"0003_t1_mprage_sag": 4, added: 3}
    assert (more.placed, more.present, more.problems) == (7, 0, [])  # new instances


def test_sort_dicom_by_patient_names_each_patients_and_studys_series(tmp_path, rng):
    from medseg.io.dicom import series_folder_name

    cohort = tmp_path / "cohort"
    planes = rng.integers(0, 500, (3, 4, 5)).astype(np.int16)
    # two patients' T1 of one name; one patient scanned again a year later; one
    # series without a patient or a date
    for uid, patient, date in (
        ("1.5.1", "P-001", "20240131"),
        ("1.5.2", "P 002/b", "20240202"),
        ("1.5.3", "P-001", "20250130"),
        ("1.5.4", None, None),
    ):
        write_series(cohort / uid, planes, series=uid, number=2,
                     description="T1", patient=patient, date=date)  # fmt: skip
    out = tmp_path / "sorted"
    result = medseg("data", "sort-dicom", cohort, out, "--by-patient")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = [
        "0002_T1",
        "P-001_20240131_0002_T1",
        "P-001_20250130_0002_T1",
        "P_002_b_20240202_0002_T1",
    ]
    assert sorted(p.name for p in out.iterdir()) == expected
    for name in expected:
        assert f"{out / name}: 3 files" in result.stdout
    for name, uid in zip(expected, ("1.5.4", "1.5.1", "1.5.3", "1.5.2"), strict=True):
        ds = pydicom.dcmread(next((out / name).iterdir()))
        assert ds.SeriesInstanceUID == uid
    assert series_folder_name(None, "", "1.2", "P1", "") == (
        "P1_series_" + hashlib.sha1(b"1.2").hexdigest()[:8]
    )
