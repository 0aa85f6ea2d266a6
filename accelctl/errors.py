"""Errors caused by the user's input (config, flags, data files), as opposed to internal bugs."""


class UserError(Exception):
    """Bad input: the CLI prints the message without a traceback and exits with code 2.

    The message must say what is wrong, where (file, line, field) and how to fix it.
    """
