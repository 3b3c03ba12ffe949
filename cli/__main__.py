"""``python -m medseg_cli``: the same as the ``medseg`` command."""

from medseg_cli.main import main

main(prog_name="medseg")
