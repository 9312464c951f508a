"""What every command shares: one-line errors, the planning and layout options, tables."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import click

from ..common.units import human
from ..errors import ReapError
from ..plan import METHODS  # light: no torch
from .progress import close_bars

EXIT_BAD_INPUT = 2


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so every cleanup runs as for Ctrl-C.

    `message` says what was left behind; a command that keeps something sets it, else it is
    said from what the run published (interrupted_message)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum
        self.message: str | None = None


def interrupted_message() -> str:
    """What an interrupt leaves: the outputs already moved into place (complete), else nothing."""
    from ..common.staging import published

    done = published()
    if not done:
        return "interrupted; nothing was written (no output file or directory was left)"
    names = ", ".join(map(str, done))
    return (f"interrupted after {names} {'was' if len(done) == 1 else 'were'} written "
            f"({'it is' if len(done) == 1 else 'each is'} complete); nothing else was written")


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP act like Ctrl-C for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    saved = {s: signal.signal(s, _raise_interrupted) for s in wanted}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class NoteHandler(logging.Handler):
    """The library's notes as `note: ...` lines on stderr: held while the command checks its inputs,
    printed once it goes on (its first progress, or its end: cli/progress.py `note`), so that a
    refusal, however late its check, is the command's one line (a derived layout's note and
    calibrate's hidden-state placement are logged before the first layer's shapes are checked)."""

    def emit(self, record: logging.LogRecord) -> None:
        from .progress import note

        note(f"note: {record.getMessage()}")


def quiet_stdout() -> None:
    """Point stdout at /dev/null so no later flush (the interpreter's at exit) fails again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def one_line_errors(fn):
    """Turn ReapError (and OS errors on files) into `error: <file>: <problem>` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..common.staging import forget_published

        forget_published()  # a command run in-process after another reports only its own outputs
        try:
            return fn(*args, **kwargs)
        except ReapError as e:
            close_bars()
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly
            quiet_stdout()
            sys.exit(0)
        except OSError as e:
            close_bars()
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt as e:
            close_bars()  # the message on a line of its own, not over a bar
            signum = getattr(e, "signum", signal.SIGINT)
            message = getattr(e, "message", None) or interrupted_message()
            click.echo(message, err=True)
            sys.exit(128 + int(signum))

    return wrapper


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N, checked when the command line is parsed."""

    name = "DEVICE"

    def convert(self, value, param, ctx):
        text = str(value)
        if re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+", text):
            return text
        self.fail(f"{text!r} is not a device reapsurgery calibrates on; use auto, cpu, cuda or cuda:N", param, ctx)



# -- --json: a command's result as one JSON document on stdout --------------------------


def json_option(fn):
    """Add --json (as_json) to a command that reports a result."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as one JSON document on stdout, for scripts; notes and errors "
                             "stay on stderr.")(fn)


def _path(value) -> str:
    """Paths in the library's values (outputs, inputs, ApplyResult.out) as strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def emit_json(result: dict | list) -> None:
    """The one way every command prints its --json result: one document on stdout, strict JSON (a
    NaN or infinity, which JSON does not have, is an error, not a bare word no strict reader takes)."""
    try:
        text = json.dumps(result, indent=2, default=_path, allow_nan=False)
    except ValueError:
        from ..common.files import _first_nonfinite

        raise ReapError(None, f"--json: {_first_nonfinite(result)}, which JSON cannot hold") from None
    click.echo(text)


def plan_facts(plan) -> dict:
    """A plan (plan.Plan) as JSON values: the mask's hash and provenance, the counts and every layer's choice."""
    facts = dataclasses.asdict(plan)
    mask = facts.pop("mask")
    return {"sha256": plan.mask.sha256, "kept": plan.kept, "sparsity": plan.drop / plan.num_experts, **facts,
            "provenance": mask["provenance"]}


class OutputPath(click.Path):
    """A file or directory the command writes. `-` is refused: it is not standard output here (the
    result goes to stdout with --json), and a file named `-` is never what was meant."""

    def __init__(self):
        super().__init__(path_type=Path)
        self.name = "file"  # FILE in --help, not PATH

    def convert(self, value, param, ctx):
        if str(value) == "-":
            self.fail("'-': writing to standard output is not supported; give a path (--json prints the result "
                      "on stdout)", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT = OutputPath()


# -- planning: options shared by `plan` and `apply` ------------------------------


class Fraction(click.FloatRange):
    """--sparsity: 0 <= F < 1. A percentage (50 for half) is refused with what was meant."""

    def __init__(self):
        super().__init__(0, 1, max_open=True)

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if 1 < number <= 100:
            self.fail(f"{value} is not a fraction in [0, 1); for {value}% of the experts give {number / 100:g}", param, ctx)
        return super().convert(value, param, ctx)


PLAN_FLAGS = {"sparsity": "--sparsity", "keep": "--keep", "method": "--method",
              "preserve_super_experts": "--preserve-super-experts", "preserve_outliers": "--preserve-outliers",
              "pins": "--preserve", "strict": "--strict"}


def plan_options(fn=None, *, lists: bool = False):
    """Add the planning options (--sparsity, --keep, --method, --preserve..., --strict) to a command.

    With lists=True (`evaluate`), --sparsity and --keep take comma-separated values, one mask each."""
    many = " Comma-separated values plan one mask each." if lists else ""
    options = [
        click.option("--sparsity", type=str if lists else Fraction(),
                     metavar="F[,F...]" if lists else "F",
                     help="Fraction of routed experts removed from every MoE layer; experts dropped per layer = "
                          "F*E rounded to the nearest integer (halves up)." + many),
        click.option("--keep", type=str if lists else click.IntRange(min=1), metavar="N[,N...]" if lists else "N",
                     help="Experts kept per MoE layer (instead of --sparsity)." + many),
        click.option("--method", type=str if lists else click.Choice(METHODS), default=None,
                     metavar="M[,M...]" if lists else None,
                     help="Saliency score that ranks experts; default reap (see `reapsurgery plan --help`)."
                          + (f" Comma-separated methods ({', '.join(METHODS)}) plan one mask each, for every "
                             "--sparsity/--keep value." if lists else "")),
        click.option("--preserve-super-experts", is_flag=True,
                     help="Never drop super experts: max activation above both the 99.5th percentile of all "
                          "experts' max activations and a tenth of the largest, in the first 75% of MoE layers."),
        click.option("--preserve-outliers", is_flag=True,
                     help="Like --preserve-super-experts, in all MoE layers."),
        click.option("--preserve", "pins", metavar="L:E,...",
                     help="Never drop these experts: comma-separated LAYER:EXPERT pairs, e.g. 3:17,3:40."),
        click.option("--strict", is_flag=True,
                     help="Group-limited routers: refuse a drop count that is not a multiple of n_group "
                          "instead of rounding it to the nearest multiple."),
    ]

    def add(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return add(fn) if fn is not None else add


CHOICE_FLAGS = {"from_evaluation": "--from-evaluation", "max_kl": "--max-kl", "metric": "--metric"}


def choice_options(fn):
    """--from-evaluation REPORT, --max-kl X, --metric: plan the mask an evaluation measured best (plan, apply)."""
    options = [
        click.option("--from-evaluation", "from_evaluation", type=click.Path(path_type=Path), metavar="REPORT",
                     help="Plan the variant this `evaluate` report measured best, with the options it was planned "
                          "with: the best at --sparsity F (or --keep N), or the sparsest within --max-kl X. Only "
                          "variants planned from this saliency file are candidates."),
        click.option("--max-kl", type=click.FloatRange(min=0), metavar="X",
                     help="With --from-evaluation: the sparsest variant whose mean KL is at most X nats."),
        click.option("--metric", type=click.Choice(["kl", "perplexity", "top1"]), default=None,
                     help="With --from-evaluation: what 'best' means (default kl: lowest mean KL; perplexity: "
                          "lowest; top1: highest top-1 agreement)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_from_options(saliency: Path, ckpt: Path | None, layout, opts: dict):
    """The plan `plan` and `apply` make from a saliency file: from the planning options, or, with
    --from-evaluation, the variant an evaluation report measured best (one implementation for both)."""
    if opts.get("from_evaluation") is None:
        given = [flag for key, flag in CHOICE_FLAGS.items() if opts.get(key) is not None]
        if given:
            raise ReapError(None, f"{', '.join(given)}: choose from an evaluation report; pass --from-evaluation REPORT")
        from ..plan import plan_from_files

        return plan_from_files(saliency, ckpt, layout=layout, **plan_kwargs(opts))
    given = [flag for key, flag in PLAN_FLAGS.items() if key not in ("sparsity", "keep") and opts[key] not in (None, False)]
    if given:
        raise ReapError(None, f"{', '.join(given)}: with --from-evaluation the planning options are those the "
                              "report's variant was planned with")
    from ..evaluation.choice import plan_from_evaluation

    return plan_from_evaluation(saliency, opts["from_evaluation"], ckpt, layout, sparsity=opts["sparsity"],
                                keep=opts["keep"], max_kl=opts["max_kl"], metric=opts["metric"] or "kl")


def plan_kwargs(opts: dict) -> dict:
    from ..plan import parse_pins

    return dict(sparsity=opts["sparsity"], keep=opts["keep"], method=opts["method"] or "reap",
                preserve_super_experts=opts["preserve_super_experts"],
                preserve_outliers=opts["preserve_outliers"], pins=parse_pins(opts["pins"]), strict=opts["strict"])


# -- running a model over data: options shared by `calibrate` and `evaluate` ------------


MAX_TOKENS = 2**31 - 1  # per sample: more than any model's context, and what tokenizers take (not 10^20)


def data_options(fn):
    """--dataset, --text-field, --num-samples, --max-length, --seed: which token ids to run."""
    options = [
        click.option("--dataset", metavar="FILE|ID", help="Local .jsonl/.json/.parquet/.txt file or a cached hub dataset id. "
                                       "Default: built-in text."),
        click.option("--text-field", metavar="NAME", help="Field holding the text (default: text, content or prompt)."),
        click.option("--num-samples", default=512, show_default=True, type=click.IntRange(min=1),
                     help="Samples to use."),
        click.option("--max-length", default=2048, show_default=True, type=click.IntRange(1, MAX_TOKENS),
                     help="Tokens per sample, at most."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Seed for sample selection."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_options(fn):
    """--batch-size, --device, --dtype, --trust-remote-code, --quiet: how the streamed model runs."""
    options = [
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Samples per forward batch."),
        click.option("--device", default="auto", show_default=True, type=DeviceType(),
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."),
        click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own modeling code."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_data(ckpt, dataset: str | None, text_field: str | None, num_samples: int, max_length: int, seed: int):
    """The samples of data_options for the opened checkpoint `ckpt` (tokenized with its tokenizer, every
    token id checked against its vocab_size), their provenance (with the samples' sha256: the same token
    ids, whatever the path or options that found them) and notes."""
    import hashlib

    from ..calibration.data import load_samples

    vocab = ckpt.cfg.get("vocab_size")
    if vocab is not None and not (isinstance(vocab, int) and not isinstance(vocab, bool) and vocab >= 1):
        raise ReapError(ckpt.path / "config.json", f"vocab_size must be a positive integer, found {vocab!r}")
    data = load_samples(dataset, ckpt.path, num_samples=num_samples, max_length=max_length, seed=seed,
                        text_field=text_field, vocab_size=vocab)
    digest = hashlib.sha256(json.dumps(sorted(data.samples), separators=(",", ":")).encode()).hexdigest()  # order aside
    provenance = {"dataset": data.description, "max_length": max_length, "seed": seed, "samples_sha256": digest}
    notes = []
    if len(data.samples) < num_samples:
        notes.append(f"{dataset or 'the built-in text'}: only {len(data.samples)} non-empty samples, "
                     f"{num_samples} requested (--num-samples): the results rest on fewer tokens than asked")
    return data, provenance, notes


def overwrite_option(fn):
    """--overwrite for a command that writes files: without it an existing output is refused."""
    return click.option("--overwrite", is_flag=True,
                        help="Replace an output file that exists (without it, an existing file is refused).")(fn)


LAYOUT_HELP = ("A layout file (JSON, the fields of an entry of reapsurgery/common/layouts.json) describing the "
               "checkpoint's MoE tensors, for a family reapsurgery does not know or to override the built-in one.")


def layout_option(fn):
    """Add --layout FILE to a command that opens a checkpoint."""
    return click.option("--layout", "layout_file", type=click.Path(path_type=Path), metavar="FILE",
                        help=LAYOUT_HELP)(fn)


def layout_from(path: Path | None):
    from ..common.layouts import load_layout_file

    return load_layout_file(str(path)) if path is not None else None


def table(rows: list[tuple], indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _score_range(scores: list) -> str:
    seen = [s for s in scores if s is not None]
    never = len(scores) - len(seen)
    text = f"{fmt(min(seen))}..{fmt(max(seen))}" if seen else "-"
    return text + (f" (+{never} never routed)" if never else "")


def echo_plan(plan, with_table: bool = True) -> None:
    E = plan.num_experts
    if with_table:
        click.echo(f"plan ({plan.method}): keep {plan.kept} of {E} routed experts in each of {len(plan.layers)} "
                   f"MoE layers (drop {plan.drop}, sparsity {plan.drop / E:.4g})")
        rows = [("layer", "never routed", "preserved", "kept scores", "dropped scores")]
        for l, p in sorted(plan.layers.items()):
            preserved = " ".join(map(str, sorted(set(p.super_experts) | set(p.pinned)))) or "-"
            rows.append((l, len(p.never_routed), preserved, _score_range([p.scores[e] for e in p.kept]),
                         _score_range([p.scores[e] for e in p.dropped])))
        table(rows)
    for text in plan.notes:  # held with the library's: `evaluate` plans before its data and model are checked
        logging.getLogger("reapsurgery").info(text)


def echo_mtp(dropped: str | None, kept: list[int], notes: list[str], preview: bool, indent: str,
             draft_bytes: int | None = None) -> None:
    """What happens to multi-token-prediction blocks: one line when dropped, kept and pruned, or a draft."""
    if dropped:
        click.echo(f"{indent}{'dry run: ' if preview else ''}{dropped}")
    if kept:
        click.echo(f"{indent}{'would keep' if preview else 'kept'} multi-token-prediction layers {kept}, "
                   "pruned with the mask like the others")
    if draft_bytes is not None:
        click.echo(f"{indent}{'would write' if preview else 'wrote'} mtp-draft/ ({human(draft_bytes)}): the "
                   "multi-token-prediction block unpruned, with the source's config, a draft model for vLLM's "
                   "--speculative-config '{\"method\": \"mtp\", \"model\": \"OUT/mtp-draft\", ...}'")
    for note in notes:
        click.echo(f"{indent}note: {note}")
