"""Errors that the CLI turns into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input from the user: a flag, a config key, a file. The message names the problem and the fix."""


class IntegrityError(Exception):
    """Stored data does not match its recorded checksum, size or identity."""
