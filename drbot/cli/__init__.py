"""The drbot command: one module per subcommand; the only layer that prints or exits."""
