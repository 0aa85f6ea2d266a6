"""Errors caused by the user's input (config, flags, data files), as opposed to internal bugs.

Each carries the process exit code the CLI uses for it (documented in the README):
2 bad input, 3 training stopped on a non-finite loss, 75 preempted (checkpoint written; resume).
"""


class UserError(Exception):
    """Bad input: the CLI prints the message without a traceback and exits with `exit_code`.

    The message must say what is wrong, where (file, line, field) and how to fix it.
    """

    exit_code = 2


class FieldError(UserError):
    """Bad input tied to one config field, e.g. ("data", "name").

    Raised below the config layer (which has no file positions there); `make_setup` turns it into
    a `ConfigError` located at that field's file:line:col.
    """

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        self.path, self.message = tuple(path), message
        super().__init__(f"{'.'.join(self.path)}: {message}")


class NonFiniteLoss(UserError):
    """Training stopped (`train.on_nan: stop`): a step's loss or gradients were not finite."""

    exit_code = 3


class Preempted(UserError):
    """SIGTERM/SIGINT: the run wrote a checkpoint and stopped; `--resume` continues it.

    Exit code 75 is EX_TEMPFAIL of sysexits.h: a temporary failure, retrying is expected.
    """

    exit_code = 75
