"""One module per ``avarc`` subcommand."""
