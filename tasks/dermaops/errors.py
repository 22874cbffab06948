"""Errors a stage reports to its user as one line on stderr (no traceback)."""


class StageError(Exception):
    """A user-facing failure: bad input, bad flag, missing artifact, failed check.

    The message must name the bad thing (file, column, value, allowed values) so that the
    one line printed on stderr is enough to act on.
    """

    exit_code = 2


class TransientError(StageError):
    """A failure worth retrying at the orchestrator level (network, 5xx after in-task retries)."""

    exit_code = 3
