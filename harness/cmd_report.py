from .report import add_parser  # noqa: F401  (CLI discovery: harness.cmd_<name>.add_parser)
