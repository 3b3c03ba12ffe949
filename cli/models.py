"""``medseg models``: the models shipped with medseg."""

from __future__ import annotations

import click


@click.command("models")
def models() -> None:
    """List the models shipped with medseg (usable as --model NAME)."""
    from medseg.bundle import read_metadata, shipped_models

    shipped = shipped_models()
    if not shipped:
        click.echo("no models are shipped with this installation")
        return
    for name, folder in shipped.items():
        metadata = read_metadata(folder)
        names = ", ".join(f"{label.value}={label.name}" for label in metadata.labels)
        spacing = metadata.preprocessing.get("target_spacing_mm")
        spacing_text = (
            " x ".join(f"{s:g}" for s in spacing) + " mm" if spacing else "scan's own"
        )
        if metadata.get("weights_dtype", "float32") != "float32":
            spacing_text += f", {metadata['weights_dtype']} weights"
        evaluation = metadata.get("evaluation")
        if evaluation:
            score_text = (
                "Dice "
                + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["dice"].items())
                + f" on {evaluation['cases']} unseen cases ({evaluation['what']})"
            )
        else:
            scores = metadata.get("validation") or {}
            score_text = "validation " + (
                ", ".join(
                    f"{k} {v:.3f}" if v is not None else f"{k} -"
                    for k, v in sorted(scores.items())
                )
                or "none recorded"
            )
        click.echo(
            f"{name}: {metadata.get('task')}, {metadata.get('spatial_dims')}D, "
            f"labels {names or '-'}, spacing {spacing_text}; {score_text}"
        )
