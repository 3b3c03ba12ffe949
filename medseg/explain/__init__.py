"""See what a network learned and what it looks at: occlusion, saliency and
Grad-CAM maps of a target (a segmentation label or a class) on a scan, a layer's
kernels, and the feature maps a layer makes of a scan.

    from medseg import explain

    subject = explain.prepare("hippocampus", "scan.nii.gz", label="Anterior")
    result = explain.occlusion(subject)            # an Explanation
    explain.write_explanation(result, Path("out"), "scan")
    explain.write_kernels(explain.kernels(subject.model), Path("out"), "scan")
"""

from medseg.explain.layers import Activations, Kernels, activations, kernels
from medseg.explain.maps import (
    Explanation,
    gradcam,
    occlusion,
    occlusion_estimate,
    occlusion_passes,
    saliency,
)
from medseg.explain.subject import Subject, prepare
from medseg.explain.write import write_activations, write_explanation, write_kernels

__all__ = [
    "Activations",
    "Explanation",
    "Kernels",
    "Subject",
    "activations",
    "gradcam",
    "kernels",
    "occlusion",
    "occlusion_estimate",
    "occlusion_passes",
    "prepare",
    "saliency",
    "write_activations",
    "write_explanation",
    "write_kernels",
]
