"""Command line: parse, call one library function, print. Errors are one line and exit code 2.

One module per stage's commands; this one only assembles the group, in pipeline order.
"""

from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from .apply import apply, verify
from .calibrate import calibrate, merge_saliency
from .evaluate import evaluate
from .inspect import architectures, inspect_cmd
from .common import EXIT_BAD_INPUT, NoteHandler, quiet_stdout, signals_as_interrupts
from .plan import plan
from .progress import close_bars, hold_notes, release_notes


def show_notes() -> None:
    """The library's notes (logger "reapsurgery", level INFO) as `note: ...` lines on stderr, held
    until the command goes on (NoteHandler)."""
    log = logging.getLogger("reapsurgery")
    for h in [h for h in log.handlers if isinstance(h, NoteHandler)]:
        log.removeHandler(h)  # one per command: an earlier in-process run's held notes are not this one's
    log.addHandler(NoteHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
    hold_notes()


class PipelineGroup(click.Group):
    """Lists commands in the order they are used, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors as one `error:` line (exit 2), SIGTERM/SIGHUP handled like Ctrl-C,
        and a closed stdout (`| head`) ending the run quietly."""
        try:
            with signals_as_interrupts():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                release_notes()  # the command went through: its notes are printed, at the latest now
                sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        except click.exceptions.NoArgsIsHelpError as e:  # `reapsurgery` alone: its help, not an error
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            close_bars()
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as e:
            close_bars()
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            close_bars()
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            quiet_stdout()
            sys.exit(0)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)



@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reapsurgery")
def main() -> None:
    """Prune routed experts out of Mixture-of-Experts checkpoints on disk.

    \b
    Typical run (CKPT: a checkpoint directory, or a hub id org/name[@revision]
    already in the local Hugging Face cache):
      reapsurgery calibrate ckpt/ -o saliency.json --dataset data.jsonl  # measure experts
      reapsurgery plan saliency.json --sparsity 0.5 -o mask.json         # choose experts
      reapsurgery evaluate ckpt/ --mask mask.json # what it costs: KL, agreement, perplexity
      reapsurgery apply mask.json ckpt/ out/      # write the pruned checkpoint
      reapsurgery verify out/                     # check it is self-consistent

    Every command that reports a result takes --json: one JSON document on stdout.
    """
    show_notes()


main.add_command(calibrate)
main.add_command(merge_saliency)
main.add_command(plan)
main.add_command(evaluate)
main.add_command(apply)
main.add_command(verify)
main.add_command(inspect_cmd)
main.add_command(architectures)
