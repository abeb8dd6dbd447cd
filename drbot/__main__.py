"""`python -m drbot`: the same as the `drbot` command (the daemon runs its jobs this way)."""

from drbot.cli.main import main

main()
