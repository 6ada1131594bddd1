"""The ``avarc`` command line: thin Typer commands over ``core``."""
