"""The ``bilalora`` command line (installed as ``bilalora.cli``): a thin Typer layer over the library."""
