"""`python -m sandfleet` is the `sandfleet` command."""

from sandfleet.cli import main

main()
