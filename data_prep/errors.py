"""The one exception type data_prep raises for user errors (bad input, missing files, unreachable registry)."""


class DataPrepError(Exception):
    """A user-facing error: the message names the file / source / value, what is wrong and what to do.

    The command line prints it without a traceback and exits with status 2.
    """
