"""The `dra-pipe` command line: one module per command group, registered here. Every command reads
pipeline.yaml; its flags override the file's keys."""
from __future__ import annotations

import errno
import re
import signal
import sys

import typer

from pipeline.cli import analyze, bench, data, eval, extract, generate, models, repair, run, select, sweep, train
from pipeline.config import key_spec
from pipeline.console import interrupt_reported, stopped_waiting
from stores.errors import IntegrityError, StoppedWaiting, Terminated, UserError, install_sigterm_handler
from stores.remote import as_url, push_changed

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="dra-pipe: diffusion models as data source and as frozen teacher for adversarial training.\n\n"
                       "Stage 1 writes images and diffusion features once into sharded stores; stage 2 streams them.")
for group in (data, models, generate, extract, select, repair, train, eval, analyze, run, sweep, bench):
    group.register(app)


try:
    from typer._click import exceptions as click_errors  # typer >= 0.22 vendors click
except ImportError:
    from click import exceptions as click_errors


CONFIG_KEY = re.compile(r"\[config ([a-z_]+\.[a-z_]+)")


def with_default(text: str) -> str:
    """`[config generate.n]` in an option's help -> `[config generate.n, built-in default 5000]`: every flag that
    stands for a key says its default (pipeline.yaml may set another; `dra-pipe config` shows the resolved one)."""
    def add(match: re.Match) -> str:
        default = key_spec(match.group(1)).default
        return f"{match.group(0)}, built-in default {'null' if default is None else default}"
    return CONFIG_KEY.sub(add, text)


def _prepare_help(command) -> None:
    """Help is rendered as markdown, where `<root>` would be an HTML tag and vanish: escape every `<`; and name
    each key's default."""
    if command.help and "\\<" not in command.help:
        command.help = command.help.replace("<", "\\<")
    for param in command.params:
        text = getattr(param, "help", None)
        if text and "\\<" not in text:
            param.help = with_default(text).replace("<", "\\<")
    for sub in getattr(command, "commands", {}).values():
        _prepare_help(sub)


INTERRUPTED = "interrupted: finished shards and checkpoints are kept; rerun the same command to resume"


def one_line(exc: Exception) -> str:
    """A message that quotes a library's error can hold newlines: the user gets one line all the same."""
    return " ".join(as_url(str(exc)).split())


def usage_line(exc: click_errors.UsageError) -> str:
    """A usage error (unknown option, missing argument, bad value) as one line naming the option and the help."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[0].lower() + message[1:] if message else "bad usage"
    where = f"; see {exc.ctx.command_path} --help" if exc.ctx is not None else ""
    return f"{message}{where}"


def _interrupt_line(exc: BaseException) -> str:
    waiting = stopped_waiting(exc)
    return f"interrupted: {waiting}" if waiting else INTERRUPTED


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}     # no space, over quota, over the file-size limit


def full_disk_line(exc: OSError) -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    fix = {errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
           errno.EFBIG: ("a file grew past the file-size limit", "raise the limit (ulimit -f)")}.get(
        exc.errno, ("no space left on device", "free space (the plan printed above says how much the stage writes)"))
    return f"{fix[0]}{where}; {fix[1]} and rerun the same command: finished shards and checkpoints are kept"


def _interrupted_status() -> int:
    return 143 if Terminated.seen else 130         # 128 + SIGTERM's number, as a shell reports a terminated job


def _run_and_push(command):
    """Run the command; with an object-store root, then upload the small files it wrote in place (figures,
    tracker logs): the store's own records and shards are uploaded as they are completed."""
    try:
        code = command.main(prog_name="dra-pipe", standalone_mode=False)
    except SystemExit as exc:
        if exc.code in (0, None):
            push_changed()
        raise
    push_changed()
    return code


def main() -> None:
    """Entry point: bad input -> one line and exit 2; damaged data -> one line and exit 1; Ctrl-C or SIGTERM ->
    one line and exit 130 or 143."""
    Terminated.seen = False                        # in-process callers (tests) run main() more than once
    install_sigterm_handler()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over `ulimit -f`: a write fails with EFBIG instead of a core dump
    command = typer.main.get_command(app)
    _prepare_help(command)
    try:
        code = _run_and_push(command)
        if code == 130 and not interrupt_reported():              # typer turns Ctrl-C into a silent Exit(130)
            print(f"interrupted: {StoppedWaiting.last}" if StoppedWaiting.last else INTERRUPTED, file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(_interrupted_status() if code == 130 else code)
    except click_errors.NoArgsIsHelpError as exc:     # the help is printed already
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        print(f"error: {usage_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except click_errors.ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)   # one line, like the rest
        sys.exit(exc.exit_code)
    except typer.Abort as exc:
        print(_interrupt_line(exc), file=sys.stderr)
        sys.exit(_interrupted_status())
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except IntegrityError as exc:
        print(f"data error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        if not interrupt_reported():
            print(_interrupt_line(exc), file=sys.stderr)
        sys.exit(_interrupted_status())
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        print(f"error: {full_disk_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        from pipeline.parallel import JobFailed
        runner = sys.modules.get("pipeline.shards.runner")   # never imported: none of its errors (no Ray needed)
        if isinstance(exc, (JobFailed, *((runner.ShardFailed, runner.WorkerStartError) if runner else ()))):
            print(f"error: {exc}; finished shards are kept, rerun the same command to resume", file=sys.stderr)
            sys.exit(1)
        raise

if __name__ == "__main__":
    main()
