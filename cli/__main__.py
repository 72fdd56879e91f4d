"""`python -m vitcompact.cli` (and `torchrun ... -m vitcompact.cli`) runs the CLI."""

from .app import main

main()
