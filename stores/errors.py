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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), unwound like Ctrl-C: finished work kept, one line, exit status 143."""

    seen = False          # a SIGTERM arrived in this process
    handled = False       # the CLI unwinds SIGTERM like this (install_sigterm_handler)


def raise_terminated(signum, frame) -> None:
    Terminated.seen = True
    raise Terminated()


def install_sigterm_handler() -> None:
    """Unwind SIGTERM like Ctrl-C in this process (main thread only). Libraries that install their own SIGTERM
    handler (Ray's core does, in C) call this again afterwards when `Terminated.handled`."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
        Terminated.handled = True
