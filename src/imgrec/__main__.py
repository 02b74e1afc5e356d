"""`python -m imgrec` is the `imgrec` command (and what `torchrun -m imgrec` starts)."""

from imgrec.cli import run

run()
