"""The CLI's options, in groups that the commands share, so an option means the same everywhere and every
command's help is sectioned by group (Data, Channel scan, Verdict, Repair, Run, Ray, Output).

Choice lists are read from the library. Each group knows its options' names, so a command hands each group's
values to the library object it builds (``ScanConfig``, ``VerdictConfig``, ``RepairConfig``) and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import click

from fmt_audit.backends.onnxrt.session import DEVICES
from fmt_audit.fmt.scan import MODES, PRESETS, SCORES
from fmt_audit.fmt.selection import SELECTIONS
from fmt_audit.repair.config import FLIPS
from fmt_audit.repair.methods.registry import DEFAULT as DEFAULT_REPAIR
from fmt_audit.repair.methods.registry import METHODS as REPAIR_METHODS
from fmt_audit.verdict.registry import CHOICES as VERDICTS
from fmt_audit.verdict.registry import DEFAULT as DEFAULT_VERDICT
from fmt_audit.verdict.registry import METHODS as VERDICT_METHODS

from .config_file import apply_config, config_inputs

STDOUT = "-"
OTHER = "Other options"


class SectionOption(click.Option):
    """An option that knows which section of the help it belongs to."""

    def __init__(self, *args, section: str = OTHER, **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """A command whose help lists its options by section, in the order the sections first appear."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "section", OTHER), []).append(record)
        for title in sorted(sections, key=lambda name: name == OTHER):     # "Other options" (--help) last
            with formatter.section(title):
                formatter.write_dl(sections[title])


def command(**kwargs) -> Callable:
    return click.command(cls=SectionedCommand, **kwargs)


class OptionGroup:
    """Options that go together, under one section of the help. ``group(command)`` attaches them;
    ``group.take(values)`` removes their values from a command's keyword arguments and returns them."""

    def __init__(self, title: str, *options: tuple[tuple[str, ...], dict]):
        self.title = title
        self.options = options
        self.names = [SectionOption(decls, **attrs).name for decls, attrs in options]

    def __call__(self, command: Callable) -> Callable:
        for decls, attrs in reversed(self.options):
            command = click.option(*decls, cls=SectionOption, section=self.title, **attrs)(command)
        return command

    def take(self, values: dict) -> dict:
        return {name: values.pop(name) for name in self.names if name in values}


def opt(*decls: str, **attrs) -> tuple[tuple[str, ...], dict]:
    return decls, attrs


DATA_HELP = "Clean labelled images: .npz (x, y) or an image folder root/<class>/*."
MEAN = opt("--mean", default=None, help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465.")
STD = opt("--std", default=None, help="Per-channel std the model expects.")
INPUT_RANGE = opt("--input-range", type=click.Choice(["0-1", "0-255", "-1-1"]), default=None,
                  help="Pixel range the model takes before --mean/--std (which are in its units).  [default: 0-1]")


MODEL = OptionGroup("Model", opt(
    "--class-output", default=None, metavar="NAME",
    help="The graph output that holds the class scores, for a model with several.  [default: the only output; "
         "else the only one shaped [N, K] (or [N, K, 1, 1]) that a Softmax makes, or the only one so shaped]"))


def model_argument(path: str, class_output: str | None):
    """MODEL as the library takes it: its path, or the model loaded with the class-score output named."""
    if class_output is None:
        return path
    from fmt_audit.model.loading import load_model

    return load_model(path, class_output)


def data_options(help: str = DATA_HELP, required: bool = True) -> OptionGroup:
    return OptionGroup("Data", opt("--data", required=required, default=None, type=click.Path(path_type=str),
                                   help=help), MEAN, STD, INPUT_RANGE)


# Options left unset (None) take the preset's value; see fmt_audit.fmt.scan.PRESETS.
SCAN = OptionGroup(
    "Channel scan",
    opt("--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True,
        help="default: mask mode, class-shift scores, the trace's flags; gradient: iterated FMT with a calibrated eps, "
             "outlier rule; "
             "paper: the published method (eps 0.06, one step, accuracy, 2-means)."),
    opt("--mode", type=click.Choice(MODES), default=None,
        help="mask: remove/amplify/invert each channel, forward passes only (ONNX Runtime); gradient: adversarial "
             "inputs per feature map (PyTorch).  [default: mask]"),
    opt("--samples", type=int, default=None, help="Clean images the channels are tested with.  [default: 256]"),
    opt("--eps", default=None, help="Gradient mode: L-inf radius in [0,1] pixel space, or 'auto'.  [default: auto]"),
    opt("--alpha", type=float, default=None, help="Gradient mode: signed-gradient step.  [default: eps/3]"),
    opt("--steps", type=int, default=None, help="Gradient mode: steps per channel.  [default: 5; paper: 1]"),
    opt("--gain", type=float, default=None, help="Mask mode: amplification of a channel.  [default: 10]"),
    opt("--score", type=click.Choice(SCORES), default=None,
        help="What selection ranks: class shift or accuracy drop.  [default: shift]"),
    opt("--selection", type=click.Choice(SELECTIONS), default=None,
        help="outlier: robust z-score within each layer; kmeans: the paper's 2-means rule; trace: the channels that "
             "carry the combined verdict's reversed trigger (repair: no per-channel test); auto: trace with the "
             "combined verdict (where a repair chooses its own channels), outlier otherwise.  [default: auto]"),
    opt("--skip-layers", default=None, help="Regular expression of Conv node names not to test."),
    opt("--max-memory", default=None, metavar="SIZE",
        help="Working memory for the scan's batches, e.g. 512M or 4G (of the GPU with --device cuda); batch sizes "
             "follow from it.  [default: half of what is free]"),
)

VERDICT = OptionGroup(
    "Verdict",
    opt("--verdict", type=click.Choice(VERDICTS), default=None,
        help="; ".join(f"{name}: {method.summary}" for name, method in VERDICT_METHODS.items())
             + f"; none: no verdict.  [default: {DEFAULT_VERDICT}]"),
    opt("--verdict-samples", type=int, default=None, metavar="N",
        help="Labelled images of --data the verdict uses (its own sample, whatever --samples is).  [default: 256]"),
    opt("--margin-restarts", type=int, default=None, metavar="R",
        help="--verdict margin: random starting images per class.  [default: 16]"),
    opt("--margin-steps", type=int, default=None, metavar="T",
        help="--verdict margin: gradient steps per start.  [default: 200]"),
)

CACHE = OptionGroup("Verdict", opt(
    "--cache", default=None, envvar="FMT_AUDIT_CACHE", metavar="DIR",
    type=click.Path(file_okay=False, path_type=str),
    help="Keep the verdict's reference networks, trained on the --data images, in DIR and reuse them when the same "
         "images come again (a scan, then a repair; a gate auditing each new model on one data file): trained "
         "once, same report.  [env: FMT_AUDIT_CACHE; default: none]"))


def reference_cache(values: dict):
    """The ReferenceCache of --cache (taken out of ``values``); None without one."""
    folder = values.pop("cache", None)
    if folder is None:
        return None
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

    return ReferenceCache(folder=usable_folder(folder, "--cache"))


def usable_folder(folder: str, option: str) -> str:
    """``folder`` made if missing and checked writable, before any work; a one-line error if it cannot be."""
    import os
    from pathlib import Path

    from fmt_audit.errors import ConfigError

    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{option} {folder}: cannot make the folder ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder}: the folder is not writable")
    return str(path)


DEVICE = opt("--device", type=click.Choice(DEVICES), default=None,
             help="Where to run: auto takes CUDA when both ONNX Runtime and torch have it.  [default: auto]")
SEED = opt("--seed", type=int, default=None,
           help="Seed of every random draw (0 to 2^32 - 1): same seed, same inputs, same report.  [default: 0]")
CONFIG = opt("--config", type=click.Path(dir_okay=False, path_type=str), default=None, is_eager=True,
             expose_value=False, callback=apply_config,
             help="Read option values from this TOML file ([scan], [repair], ... tables); options given here win.")
RUN = OptionGroup("Run", DEVICE, SEED, CONFIG)


REPAIR_METHOD_HELP = "; ".join(f"{name}: {method.summary}" for name, method in REPAIR_METHODS.items()) + "."
# The repair settings every repairing command shares (repair_settings turns them into a RepairConfig).
REPAIR = OptionGroup(
    "Repair",
    opt("--prune-drop", type=float, default=0.05, show_default=True,
        help="--method fp: prune until clean accuracy has dropped by this much."),
    opt("--clp-u", type=float, default=3.0, show_default=True,
        help="--method clp: prune channels above mean + u * std of their layer's Lipschitz bounds."),
    opt("--anp-eps", type=float, default=0.4, show_default=True,
        help="--method anp: bound of the adversary's relative change to each neuron (the reference's default)."),
    opt("--anp-tradeoff", type=float, default=0.2, show_default=True,
        help="--method anp: weight of the clean loss against the perturbed one (the reference's alpha and default)."),
    opt("--anp-iterations", type=int, default=2000, show_default=True,
        help="--method anp: mask updates of 128 images each (the reference's default; lower it on a CPU)."),
    opt("--anp-threshold", type=float, default=0.2, show_default=True,
        help="--method anp: prune the channels whose mask ends at or below this (the reference's default)."),
    opt("--ibau-rounds", type=int, default=5, show_default=True,
        help="--method ibau: perturbation searches, each followed by a pass of hypergradient steps (the "
             "reference's default)."),
    opt("--ibau-lr", type=float, default=0.001, show_default=True,
        help="--method ibau: Adam's learning rate on the weights (the reference's default)."),
    opt("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs (0: removal only)."),
    opt("--lr", type=float, default=0.01, show_default=True, help="Initial SGD learning rate (cosine to 1e-4)."),
    opt("--batch-size", type=int, default=None,
        help="Fine-tuning batch size.  [default: 256, or about ten steps per epoch on small data sets]"),
    opt("--no-augment", is_flag=True, help="Fine-tune without random crops and flips."),
    opt("--flip", type=click.Choice(FLIPS), default="auto", show_default=True,
        help="Horizontal-flip augmentation; auto: only if the model reads mirrored images as well."),
    opt("--allow-regrowth", is_flag=True,
        help="Let removed channels train again (the reference code's behaviour, for comparison)."),
    opt("--unlearn/--no-unlearn", default=None,
        help="--method fmt: also fine-tune on feature-map perturbations with their true labels.  "
             "[default: on, off under --preset paper]"),
    opt("--unlearn-eps", default="auto", show_default=True,
        help="L-inf radius of those perturbations in [0,1] pixel space; auto: the scan's calibrated eps."),
    opt("--unlearn-stamps/--no-unlearn-stamps", default=True, show_default=True,
        help="With the trace (--selection auto or trace), where repair runs it itself (not --from-report, not "
             "fleet): half the unlearning copies are the clean images stamped with the trace's reversed triggers "
             "(true labels)."),
    opt("--patch-check/--no-patch-check", default=True, show_default=True,
        help="The self-check also fits a small opaque patch into the class the verdict named on the model as given, "
             "at the place where it works best there: where on the repaired model it still leads the images there "
             "(ahead of the other classes' patches at that place), the backdoor may persist, and the stronger try "
             "stamps that patch into half of the copies. Costs about a minute per CIFAR-10-sized model on one CPU "
             "thread, more on wide images; where it leads, the try and one more verdict."),
    opt("--holdout", type=float, default=0.1, show_default=True,
        help="Share of the clean data kept out of scanning and training, to measure accuracy."),
)


def repair_method(help: str = REPAIR_METHOD_HELP) -> OptionGroup:
    return OptionGroup("Repair", opt("--method", type=click.Choice(REPAIR_METHODS), default=DEFAULT_REPAIR,
                                     show_default=True, help=help))


def json_option(what: str = "the JSON report") -> OptionGroup:
    return OptionGroup("Output", opt("--json", "json_path", default=None, type=click.Path(path_type=str),
                                     metavar="FILE", help=f"Write {what} here ('-': to stdout, the summary then "
                                                          "goes to stderr)."))


def html_option(what: str) -> OptionGroup:
    return OptionGroup("Output", opt("--html", "html_path", default=None, type=click.Path(path_type=str),
                                     metavar="FILE", help=f"Also write a self-contained HTML report ({what}) here."))


FAIL_IF_PERSISTS = OptionGroup("Output", opt(
    "--fail-if-persists", is_flag=True,
    help="Exit with code 1 when the self-check says the backdoor may persist, or cannot tell (the repaired model "
         "is written either way), for pipeline gates. A pass is not proof: the check is the verdict run again, and "
         "unlearning can hide a backdoor that still works from it (README, Limits)."))
FAIL_ON_SUSPICIOUS = OptionGroup("Output", opt(
    "--fail-on-suspicious", is_flag=True,
    help="Exit with code 1 when the verdict is suspicious or inconclusive (without a verdict: when any channel is "
         "flagged), for pipeline gates."))


# ---------------------------------------------------------------- from option values to library objects


def parse_eps(eps: str | None, option: str = "--eps") -> float | str | None:
    """'auto' stays 'auto'; anything else must be a number (the library checks its range)."""
    from fmt_audit.errors import ConfigError

    if eps is None or eps == "auto":
        return eps
    try:
        return float(eps)
    except ValueError:
        raise ConfigError(f"{option} must be 'auto' or a number in (0, 1]; got {eps!r}") from None


SIZE_UNITS = {"K": 2**-10, "M": 1.0, "G": 2**10, "T": 2**20}


def parse_size(text: str | None, option: str = "--max-memory") -> float | None:
    """'512M', '4G', '1.5g', '800' (MiB) as MiB; the library checks that it is positive."""
    from fmt_audit.errors import ConfigError

    if text is None:
        return None
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = SIZE_UNITS.get(value[-1:], None)
    try:
        return float(value[:-1] if unit else value) * (unit or 1.0)
    except ValueError:
        raise ConfigError(f"{option} must be a size such as 512M or 4G; got {text!r}") from None


def scan_settings(values: dict):
    """The ScanConfig of the Data, Channel scan and Run options (taken out of ``values``), validated by the
    library."""
    from fmt_audit.data import parse_channel_values
    from fmt_audit.fmt.scan import ScanConfig

    options = {**SCAN.take(values), **RUN.take(values)}
    mean, std, input_range = values.pop("mean", None), values.pop("std", None), values.pop("input_range", None)
    preset = options.pop("preset")
    return ScanConfig.from_preset(preset, **{**options, "eps": parse_eps(options.get("eps")),
                                             "max_memory": parse_size(options.get("max_memory")),
                                             "mean": parse_channel_values(mean, "--mean"),
                                             "std": parse_channel_values(std, "--std"),
                                             "input_range": input_range})


def verdict_settings(values: dict, seed: int):
    """The VerdictConfig of the Verdict options (taken out of ``values``), or None for ``--verdict none``."""
    from fmt_audit.verdict import VerdictConfig

    return VerdictConfig.from_options(**VERDICT.take(values), seed=seed)


def repair_settings(values: dict, seed: int, method: str = "fmt"):
    """The RepairConfig of the Repair options (taken out of ``values``), validated by the library."""
    from fmt_audit.repair.config import repair_config

    options = REPAIR.take(values)
    return repair_config(seed, method, augment=not options.pop("no_augment"),
                         unlearn_eps=parse_eps(options.pop("unlearn_eps"), "--unlearn-eps"), **options)


def check_outputs(inputs: list[str], outputs: dict[str, str | None]) -> None:
    """Refuse, before any work, an output (``{option: path}``, every output of the command at once) over an input
    (the ``--config`` file included), in a missing folder, or on another output's file."""
    from fmt_audit.model.outputs import check_output_paths

    check_output_paths({what: path for what, path in outputs.items() if path != STDOUT},
                       [*inputs, *config_inputs(click.get_current_context(silent=True))])


@contextlib.contextmanager
def made_folder(folder: str | None, option: str = "-o"):
    """``folder`` (and any missing parent) made for the command's outputs, and removed again, where still empty,
    when the command fails: a refused or failed run leaves nothing behind."""
    from pathlib import Path

    from fmt_audit.errors import OutputError

    if folder is None:
        yield
        return
    path = Path(folder)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{option} {folder}: cannot make the folder ({error.strerror or error})") from None
    try:
        yield
    except BaseException:
        for made in missing:        # deepest first
            try:
                made.rmdir()
            except OSError:         # not empty (or gone): leave it
                break
        raise


def refuse_html_to_stdout(html_path: str | None) -> None:
    from fmt_audit.errors import ConfigError

    if html_path == STDOUT:
        raise ConfigError("--html needs a file path (stdout is for the JSON report: --json -)")
