"""`python -m neuroloc_cli` runs the `neuroloc` command."""

from neuroloc_cli.cli.app import main

main()
