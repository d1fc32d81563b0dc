"""The `ascend-v4` command line: one click group, one small module per command.

Each command module defines a click command that only parses options and calls a typed function in
the same module (tests call the function directly). To add a command: write `cli/<name>.py`, then
import it below and `main.add_command(...)` it. Command modules import heavy things (torch, the
model, the checkpoint writer) inside their functions so `ascend-v4 --help` stays instant.
"""

from __future__ import annotations

import click

from ascend_v4 import __version__

# Inherited by every subcommand's context.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="ascend-v4")
def main() -> None:
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
