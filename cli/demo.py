"""``medseg demo``: the shipped model on the shipped sample, end to end, offline."""

from __future__ import annotations

from pathlib import Path

import click

from medseg_cli._tf import start_tensorflow


@click.command("demo")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("medseg-demo"),
    show_default=True,
    help="Folder for the predictions, metrics, pictures and demo.json.",
)
@click.option(
    "--model",
    default="hippocampus",
    show_default=True,
    help="Bundle folder or shipped model name.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Dataset folder (default: the sample shipped with medseg).",
)
@click.option(
    "--train",
    is_flag=True,
    help="Also train a small U-Net briefly on the cases the model saw and compare "
    "the two on the cases it did not.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Epochs of the --train model (default 6 of 20 steps).",
)
def demo(output: Path, model: str, data: Path | None, train: bool, epochs) -> None:
    """Segment the shipped sample with the shipped model, score and draw the result.

    Writes OUTPUT/predictions/, metrics.csv (per case and label), summary.json,
    report/ (overlays of the best, median and worst cases, Dice box plot) and
    demo.json (scores and timings). Cases the model was trained on are marked; the
    means are also given over the cases it never saw. Runs offline on a CPU.
    """
    import logging

    from medseg.demo import run_demo

    ctx = click.get_current_context()
    start_tensorflow(ctx.meta.get("medseg.debug", False))
    if train:
        logging.getLogger("medseg").setLevel(logging.INFO)
    result = run_demo(
        output,
        model=model,
        data=data,
        train=train,
        train_epochs=epochs,
        echo=click.echo,
    )
    timings = result["timings"]
    click.echo(
        f"\n{len(result['pictures'])} pictures in {output / 'report'}; scores in "
        f"{output / 'metrics.csv'} and {output / 'demo.json'}; "
        f"{timings['total_s']:.0f} s in all"
    )
