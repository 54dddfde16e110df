"""User-facing errors: one actionable line each.

Every mistake a user can make (a bad path, a malformed row, an unknown option, a tensor of
the wrong shape) raises a :class:`JaxalignError` whose message names the file, row or option
and says how to fix it. The CLI prints the message alone and exits with code 2.
"""


class JaxalignError(Exception):
    """A user mistake, reported as one line that names the culprit and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(JaxalignError):
    """An unknown option or an invalid option value."""


class DataError(JaxalignError):
    """A dataset file or row that cannot be used."""


class CheckpointError(JaxalignError):
    """A model folder or checkpoint that cannot be read or written."""


class ShardingError(JaxalignError):
    """A mesh or batch that does not fit the devices."""


class TrainingDiverged(JaxalignError):
    """The loss or the gradient norm became NaN or infinite."""
