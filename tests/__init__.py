import os

# Commands run in-process print as wide as the subprocess runs did (COLUMNS=200), read when the consoles are made:
# a table cell never wraps a name a test looks for (xdist's temporary paths are long).
os.environ.setdefault("COLUMNS", "200")
