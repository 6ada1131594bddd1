"""``python -m avarc``: the command line, as the ``avarc`` script runs it."""
from .cli import main

main()
