"""Errors caused by the user's input (config, flags, data files), as opposed to internal bugs."""


class UserError(Exception):
    """Bad input: the CLI prints the message without a traceback and exits with code 2.

    The message must say what is wrong, where (file, line, field) and how to fix it.
    """


class FieldError(UserError):
    """Bad input tied to one config field, e.g. ("data", "name").

    Raised below the config layer (which has no file positions there); `make_setup` turns it into
    a `ConfigError` located at that field's file:line:col.
    """

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        self.path, self.message = tuple(path), message
        super().__init__(f"{'.'.join(self.path)}: {message}")
