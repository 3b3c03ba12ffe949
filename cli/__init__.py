"""The ``medseg`` command line (installed as the ``medseg_cli`` package)."""
