"""Errors that the CLI turns into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input from the user: a flag, a config key, a file. The message names the problem and the fix."""


class IntegrityError(Exception):
    """Stored data does not match its recorded checksum, size or identity."""


class StoppedWaiting(KeyboardInterrupt):
    """Ctrl-C while waiting for another writer's lock (`--wait`): the message says that nothing was written.

    `last` keeps the message for the CLI's one interrupt line: Typer turns a Ctrl-C into a bare exit status 130."""

    last: str | None = None

    def __init__(self, message: str):
        super().__init__(message)
        StoppedWaiting.last = message
