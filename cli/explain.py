"""``medseg explain``: what a network looks at on one scan, and what it learned."""

from __future__ import annotations

from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow

METHODS = ("occlusion", "saliency", "gradcam", "filters", "activations")


@click.command("explain")
@click.option("--model", required=True, help="Bundle folder or a shipped model's name.")
@click.option(
    "--input",
    "scan",
    type=click.Path(path_type=Path),
    help="The scan to explain (all methods but filters).",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the maps, pictures and JSON.",
)
@click.option(
    "--method",
    required=True,
    type=click.Choice(METHODS),
    help="What to compute.",
)
@click.option(
    "--label",
    help="The target: a label's name or value (a class for a classifier); default "
    "the first that is not background.",
)
@click.option("--layer", help="gradcam, filters, activations: the layer (by name).")
@click.option(
    "--box", type=click.IntRange(min=1), help="occlusion: the box's side (voxels)."
)
@click.option(
    "--stride", type=click.IntRange(min=1), help="occlusion: between box positions."
)
@click.option(
    "--smooth",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="saliency: average over this many noisy copies (SmoothGrad).",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="activations: the most active channels to show.",
)
def explain(model, scan, output, method, label, layer, box, stride, smooth, top):
    """Show what a bundle's network looks at on one scan, or what it learned.

    occlusion: the fall of the target's score as a box of the scan is filled with
    its background; saliency: the gradient of the score (--smooth N: SmoothGrad);
    gradcam: a layer's feature maps weighed by their gradients (default the U-Net's
    bottleneck, a classifier's last convolution). The target's score is a label's
    mean probability inside the region the scan's prediction gives it (a
    segmentation network, on one window around that region), or a class's
    probability. Maps are written on the scan's own grid and affine (NIfTI; PNG for
    2D pictures) with a picture over the scan and a JSON of what was computed.
    filters: a convolution's kernels (default the first); activations: a layer's
    feature maps for the scan, its most active channels.
    """
    from medseg import explain as explaining
    from medseg.bundle import resolve, verify
    from medseg.io.volume import split_suffix

    start_tensorflow(click.get_current_context().meta.get("medseg.debug", False))
    bundle = resolve(model)
    if method == "filters":
        from medseg.models import load_model

        verify(bundle)
        kernels = explaining.kernels(load_model(bundle), layer, source=bundle)
        written = explaining.write_kernels(kernels, output, bundle.name)
        click.echo(f"filters of {kernels.layer} written to {written[0]}")
        return
    if scan is None:
        raise click.UsageError(f"--method {method} needs --input SCAN")
    subject = explaining.prepare(bundle, scan, label=label)
    stem = split_suffix(Path(scan))[0]
    if method == "activations":
        if layer is None:
            raise click.UsageError("--method activations needs --layer NAME")
        acts = explaining.activations(subject, layer, top)
        written = explaining.write_activations(acts, output, stem)
        click.echo(f"activations of {layer} written to {written[0]}")
        return
    if method == "occlusion":
        from medseg.config import format_duration

        passes, seconds = explaining.occlusion_estimate(subject, box, stride)
        click.echo(
            f"occlusion: {passes} forward passes of 8 occluded inputs, about "
            f"{format_duration(seconds)}"
        )
        with click.progressbar(length=passes, label="occluding") as bar:
            result = explaining.occlusion(
                subject,
                box=box,
                stride=stride,
                progress=lambda done, total: bar.update(done - bar.pos),
            )
    elif method == "saliency":
        result = explaining.saliency(subject, smooth=smooth)
    else:
        result = explaining.gradcam(subject, layer=layer)
    written = explaining.write_explanation(result, output, stem)
    click.echo(
        f"{method} of {subject.label_name!r} (score {result.score:.3f}) written to "
        f"{written[0]}"
    )
