"""`python -m guard.cli`: the `guard` command."""

from guard.cli import main

main()
