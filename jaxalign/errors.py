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


class Preempted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint of the last finished step.

    Not a user mistake: the CLI prints the message and exits with 128 + the signal number (143 for
    SIGTERM, 130 for SIGINT), as a process killed by that signal would.
    """

    def __init__(self, step: int, signum: int, checkpoint: str):
        import signal

        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        super().__init__(f"preempted at step {step} ({name}); saved {checkpoint}; "
                         "resume with --resume_from_checkpoint latest")
