"""The `ascend-v4` command line: one click group, one small module per command.

Each command module defines a click command that only parses options and calls a typed function in
the same module (tests call the function directly). To add a command: write `cli/<name>.py`, then
import it below and `main.add_command(...)` it. Command modules import heavy things (torch, the
model, the checkpoint writer) inside their functions so `ascend-v4 --help` stays instant.

Errors: `_Main.invoke` turns the project's own errors (`ConfigError`, `CheckpointError`, `QuantizeError`)
and `OSError`s raised by any command into one `error: ...` line on stderr and exit status 1 (Ctrl-C: 130);
`--debug` or `ASCEND_V4_DEBUG=1` also prints the traceback. Anything else (a bug) keeps its traceback, and
click's own exceptions (usage errors, `ClickException`, `Abort`, `Exit`) are left to click.
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Any

import click

from ascend_v4 import __version__

# Inherited by every subcommand's context.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# The project's error types: (module, class). Looked up in sys.modules only when an error reaches the CLI
# (an instance of one can exist only once its module is imported), so nothing is imported at startup.
PROJECT_ERRORS = (("ascend_v4.model.args", "ConfigError"), ("ascend_v4.checkpoint.errors", "CheckpointError"),
                  ("ascend_v4.quant.errors", "QuantizeError"))
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def command_line() -> list[str]:
    """How to run `ascend-v4` in this environment as a subprocess (tests, tools): the entry-point script beside
    this interpreter, else the one on PATH, else `python -c` on `main` (never `python -m`, whose working
    directory on sys.path can shadow the installed package: code-style.md §7.1 trap 2)."""
    import shutil
    from pathlib import Path

    script = Path(sys.executable).with_name("ascend-v4")
    if script.is_file():
        return [str(script)]
    found = shutil.which("ascend-v4")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from ascend_v4.cli import main; sys.exit(main())"]


def error_message(e: BaseException) -> str | None:
    """The `error: ...` text of an exception the CLI reports without a traceback; None for anything else.

    OSError: strerror and file name(s), e.g. "permission denied: /data/x.safetensors". A broken pipe (EPIPE)
    is left to click, which exits quietly.
    """
    if isinstance(e, OSError):
        if e.errno == errno.EPIPE:
            return None
        text = e.strerror[:1].lower() + e.strerror[1:] if e.strerror else (str(e) or type(e).__name__)
        names = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return f"{text}: {' -> '.join(names)}" if names else text
    types = tuple(getattr(sys.modules[m], c) for m, c in PROJECT_ERRORS if hasattr(sys.modules.get(m), c))
    return (str(e) or type(e).__name__) if types and isinstance(e, types) else None


def _debug(ctx: click.Context) -> bool:
    if ctx.params.get("debug"):
        return True
    from ascend_v4 import envs

    try:
        return envs.debug()
    except ValueError:
        return True  # a malformed ASCEND_V4_DEBUG: show more rather than less


class _Main(click.Group):
    """The `ascend-v4` group: one line per error, no traceback (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if _debug(ctx):
                traceback.print_exc()
            click.echo("error: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            message = error_message(e)
            if message is None:
                raise
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"error: {message}", err=True)
            raise click.exceptions.Exit(EXIT_ERROR) from None


@click.group(cls=_Main, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="ascend-v4")
@click.option("--debug", is_flag=True,
              help="Show the Python traceback of an error (also ASCEND_V4_DEBUG=1); default: one line.")
def main(debug: bool) -> None:
    """DeepSeek-V4 (Flash / Pro) inference on Ascend NPUs, with a CPU/CUDA fallback.

    \b
    Examples:
      ascend-v4 generate --prompt "Hello"    # tiny dummy model, made on first use
      ascend-v4 info --model flash          # sizes of V4-Flash, no weights needed
      ascend-v4 dummy-checkpoint --preset tiny --out /tmp/tiny
      ascend-v4 COMMAND --help              # options and examples of one command
    """


from ascend_v4.cli.doctor import doctor  # noqa: E402
from ascend_v4.cli.dummy import dummy_checkpoint  # noqa: E402
from ascend_v4.cli.generate import generate  # noqa: E402
from ascend_v4.cli.info import info  # noqa: E402
from ascend_v4.cli.serve import serve  # noqa: E402
from ascend_v4.cli.bench import bench  # noqa: E402
from ascend_v4.cli.plan import plan  # noqa: E402
from ascend_v4.cli.quantize import quantize  # noqa: E402

main.add_command(info)
main.add_command(dummy_checkpoint)
main.add_command(generate)
main.add_command(serve)
main.add_command(bench)
main.add_command(doctor)
main.add_command(quantize)
main.add_command(plan)

__all__ = ["main"]
