"""Which scans does predict's out-of-distribution check flag?

A segmentation bundle (default: the shipped hippocampus model) segments (with its
default test-time mirroring) scans that look like its training scans, and scans that
do not, and the check's two scores (normalised intensities, bottleneck features;
each a distance over its threshold, flagged above 1) are recorded for each:

* in distribution: the bundle's validation cases (``--data``; a run of one fold,
  which did not train on them), else the cases of ``--sample`` (the shipped sample,
  which the shipped model trained on);
* corrupted copies of each of the first ``--corrupt`` of those: pure noise (Gaussian,
  the scan's mean and deviation), inverted contrast (max + min - value), heavy blur
  (Gaussian, sigma 3 voxels);
* foreign crops of the scan's size in mm from ``--samples`` (../shared/datasets):
  an abdominal CT, an abdominal MR, and the MNI brain template (T1) cut at the top
  of the head (the wrong part of the right organ) and around the left hippocampus
  (an average of many brains: smoother than any scan).

Writes experiments/results/ood_<name>.json.

    python experiments/ood_check.py --name hippocampus_shipped
    python experiments/ood_check.py --model runs/recipes/15m/plain/fold_0 \
        --data ../shared/datasets/hippocampus --name hippocampus_fold0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLES = REPO.parent / "shared" / "datasets" / "samples"


def crop_like(source: Path, extent_mm, centre_fraction):
    """A crop of the scan ``source`` of ``extent_mm`` (RAS) around the point at
    ``centre_fraction`` of each axis of its RAS-reoriented array."""
    from medseg.io import read_volume
    from medseg.preprocessing import geometry

    volume = read_volume(source)
    ras, _ = geometry.reorient_to_canonical(volume)
    shape = np.array(ras.spatial_shape)
    size = np.maximum(2, np.round(np.array(extent_mm) / np.array(ras.spacing))).astype(
        int
    )
    size = np.minimum(size, shape)
    centre = np.round(np.array(centre_fraction) * (shape - 1)).astype(int)
    start = np.clip(centre - size // 2, 0, shape - size)
    box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
    array = np.asarray(ras.array)[box]
    affine = ras.affine.copy()
    affine[:3, 3] = ras.affine[:3, :3] @ start + ras.affine[:3, 3]
    return ras.with_array(np.ascontiguousarray(array), affine)


def corrupted(volume, rng):
    from scipy.ndimage import gaussian_filter

    array = np.asarray(volume.array, np.float32)
    return {
        "noise": rng.normal(array.mean(), array.std(), array.shape).astype(np.float32),
        "inverted": array.max() + array.min() - array,
        "blur_3_voxels": gaussian_filter(array, sigma=(3, 3, 3, 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--data", type=Path, help="dataset of a fold run's cases")
    parser.add_argument("--sample", type=Path, default=REPO / "data" / "sample")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--corrupt", type=int, default=4)
    parser.add_argument("--name", default="hippocampus_shipped")
    args = parser.parse_args()

    import machine

    from medseg import bundle
    from medseg.datasets.layouts import load_dataset
    from medseg.inference import Segmenter
    from medseg.io import read_volume

    path = bundle.resolve(args.model)
    metadata = bundle.verify(path)
    segmenter = Segmenter(path, mirror_axes=metadata.mirror_axes)
    held_out = metadata["split"].get("validation") or []
    if args.data is not None and held_out:
        cases = {c.case_id: c for c in load_dataset(args.data).cases}
        real = {i: cases[i].images[0] for i in held_out}
        kind = "validation cases (held out of its training)"
    else:
        real = {
            p.name.split(".")[0]: p
            for p in sorted((args.sample / "imagesTr").iterdir())
        }
        kind = "the shipped sample's cases (trained on)"

    rows = []

    def check(group, name, volume):
        prediction = segmenter.predict(volume)
        scores = prediction.ood.scores()
        flagged = bool(prediction.ood.notes)
        notes = [n.split(": ", 1)[-1] for n in prediction.ood.notes]
        rows.append(
            {"group": group, "scan": name, **scores, "flagged": flagged, "notes": notes}
        )
        mark = "FLAGGED" if flagged else ""
        print(
            f"{group:<10} {name:<34} intensity {scores['ood_intensity']:>7} "
            f"features {scores['ood_features']:>7} {mark}"
        )

    rng = np.random.default_rng(0)
    first = None
    for index, (case, image) in enumerate(real.items()):
        volume = read_volume(image)
        check("real", case, volume)
        if index < args.corrupt:
            first = first or volume
            for what, array in corrupted(volume, rng).items():
                check("corrupted", f"{case} {what}", volume.with_array(array))
    extent = np.array(first.spatial_shape) * np.array(first.spacing)
    foreign = {
        "abdominal CT crop": ("example_ct_sm.nii.gz", (0.5, 0.5, 0.5)),
        "abdominal MR crop": ("example_mr_sm.nii.gz", (0.5, 0.5, 0.5)),
        "brain T1, top of the head": (
            "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            (0.5, 0.5, 0.85),
        ),
        "brain T1, left hippocampus": (
            "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            (0.35, 0.45, 0.3),
        ),
    }
    for what, (file, centre) in foreign.items():
        if (args.samples / file).is_file():
            check("foreign", what, crop_like(args.samples / file, extent, centre))
    real_rows = [r for r in rows if r["group"] == "real"]
    other = [r for r in rows if r["group"] != "real"]
    report = {
        "command": "python experiments/ood_check.py " + " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "model": str(args.model),
        "in_distribution": kind,
        "real_passed": f"{sum(not r['flagged'] for r in real_rows)} of "
        f"{len(real_rows)}",
        "others_flagged": f"{sum(r['flagged'] for r in other)} of {len(other)}",
        "scans": rows,
    }
    output = HERE / "results" / f"ood_{args.name}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"real scans passed: {report['real_passed']}; corrupted and foreign "
          f"flagged: {report['others_flagged']}; written to {output}")  # fmt: skip


if __name__ == "__main__":
    main()
