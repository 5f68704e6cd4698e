"""Errors that the command line turns into one-line messages (no traceback, non-zero exit)."""


class CryoaiError(Exception):
    """Base class of errors that are reported to the user in one line."""


class InputError(CryoaiError):
    """An input file or argument is missing, malformed or inconsistent.

    The message names the file and the problem, e.g.
    ``"particles.star: no rlnImageName column in the particle table"``.
    """


class OutputError(CryoaiError):
    """An output location cannot be used (would overwrite a previous run, not writable, ...)."""
