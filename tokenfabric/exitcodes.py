"""Exit codes of the `tokenfabric` command, shared by every subcommand."""

OK = 0
FAILED = 1  # the command ran and the job failed
USAGE = 2  # bad flags or arguments (click's own code)
MISSING = 3  # an external piece or an extra the command needs is absent
INVALID_INPUT = 4  # an input file (policy, fabric, config) did not validate
