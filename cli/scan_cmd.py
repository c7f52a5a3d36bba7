"""``fmt-audit scan MODEL --data DATA``: feature map testing of every Conv channel."""

from __future__ import annotations

import click

from .config_file import config_option
from .console import STDOUT, progress, say, write_report

# Options left unset (None) take the preset's value; see fmt_audit.fmt.scan.PRESETS.
DATA_HELP = "Clean labelled images: .npz (x, y) or an image folder root/<class>/*."
SCAN_OPTIONS = [
    click.option("--preset", type=click.Choice(["default", "gradient", "paper"]), default="default",
                 show_default=True,
                 help="default: mask mode, class-shift scores, outlier rule; gradient: iterated FMT with a "
                      "calibrated eps; paper: the published method (eps 0.06, one step, accuracy, 2-means)."),
    click.option("--mode", type=click.Choice(["gradient", "mask"]), default=None,
                 help="mask: remove/amplify/invert each channel, forward passes only (ONNX Runtime); "
                      "gradient: adversarial inputs per feature map (PyTorch).  [default: mask]"),
    click.option("--samples", type=int, default=None, help="Number of clean images to test with.  [default: 256]"),
    click.option("--eps", default=None,
                 help="Gradient mode: L-inf radius in [0,1] pixel space, or 'auto'.  [default: auto]"),
    click.option("--alpha", type=float, default=None, help="Gradient mode: signed-gradient step.  [default: eps/3]"),
    click.option("--steps", type=int, default=None, help="Gradient mode: steps per channel.  [default: 5; paper: 1]"),
    click.option("--gain", type=float, default=None, help="Mask mode: amplification of a channel.  [default: 10]"),
    click.option("--score", type=click.Choice(["shift", "accuracy"]), default=None,
                 help="What selection ranks: class shift or accuracy drop.  [default: shift]"),
    click.option("--selection", type=click.Choice(["outlier", "kmeans"]), default=None,
                 help="outlier: robust z-score within each layer; kmeans: the paper's 2-means rule.  "
                      "[default: outlier]"),
    click.option("--skip-layers", default=None, help="Regular expression of Conv node names not to test."),
    click.option("--mean", default=None, help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465."),
    click.option("--std", default=None, help="Per-channel std the model expects."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]"),
    click.option("--seed", type=int, default=None, help="[default: 0]"),
    click.option("--verdict", type=click.Choice(["margin", "sink", "universal", "transfer", "shortcut", "untransferred",
                                                    "cleanse", "combined", "none"]),
                 default=None,
                 help="The model-level verdict: margin: the maximum-margin test (MM-BD, data-free); sink: where "
                      "FMT's gradient test sends predictions; universal: how far one faint perturbation carries "
                      "the --data images into each class; transfer: the same, and whether that perturbation also "
                      "moves small clean networks trained on the --data images; shortcut: which class those "
                      "perturbations carry furthest beyond what they do in the clean networks; untransferred: "
                      "which class one perturbation reaches alone, less what it moves in the clean networks; "
                      "cleanse: which class a far smaller mask-and-pattern trigger reaches than any other "
                      "(Neural Cleanse); combined: the trigger search's mask ratio and the untransferred test, "
                      "suspicious when either is over its cut, weighed by whether the two, and smooth random "
                      "images, name the same class; none.  "
                      "[default: margin]"),
    click.option("--margin-restarts", type=int, default=None, metavar="R",
                 help="--verdict margin: random starting images per class.  [default: 16]"),
    click.option("--margin-steps", type=int, default=None, metavar="T",
                 help="--verdict margin: gradient steps per start.  [default: 200]"),
    click.option("--verdict-probe", type=int, default=None, metavar="K",
                 help="--verdict sink in mask mode: channels the gradient test probes (0: no verdict).  "
                      "[default: 64]"),
    click.option("--max-memory", default=None, metavar="SIZE",
                 help="Working memory for the scan's batches, e.g. 512M or 4G (of the GPU with --device cuda); "
                      "batch sizes follow from it.  [default: half of what is free]"),
]


def scan_options(command=None, *, data_help: str | None = None):
    """Attach ``--data`` (required unless ``data_help`` says otherwise) and the scan options; ``repair``
    and ``compare`` reuse them."""
    def attach(command):
        for option in reversed(SCAN_OPTIONS):
            command = option(command)
        return click.option("--data", required=data_help is None, default=None, type=click.Path(path_type=str),
                            help=data_help or DATA_HELP)(command)
    return attach(command) if command is not None else attach


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


def scan_config(preset: str, mean: str | None, std: str | None, eps: str | None, max_memory: str | None = None,
                **options):
    """A ScanConfig from the scan options, validated by the library."""
    from fmt_audit.data import parse_channel_values
    from fmt_audit.fmt.scan import ScanConfig

    return ScanConfig.from_preset(preset, eps=parse_eps(eps), mean=parse_channel_values(mean, "--mean"),
                                  std=parse_channel_values(std, "--std"), max_memory=parse_size(max_memory),
                                  **options)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@scan_options
@config_option
@click.option("-o", "--json", "output", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Write the JSON report here ('-': to stdout, the summary then goes to stderr).")
@click.option("--html", "html_path", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Also write a self-contained HTML report (tables and score plots) here.")
@click.option("--fail-on-suspicious", is_flag=True,
              help="Exit with code 1 when the verdict is suspicious or inconclusive (without a verdict: when any "
                   "channel is flagged), for pipeline gates.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Test the layers on Ray workers, in chunks of layers (same report as without).")
@click.option("--address", default=None, help="With --ray: join this Ray cluster (default: Ray on this machine).")
@click.option("--workers", type=int, default=None, help="With --ray on this machine: CPUs to use.  [default: all]")
@click.pass_context
def scan(ctx: click.Context, model: str, data: str, output: str | None, html_path: str | None,
         fail_on_suspicious: bool, use_ray: bool, address: str | None, workers: int | None, **options) -> None:
    """Test every Conv channel of MODEL and flag the suspicious ones."""
    from fmt_audit.fmt.scan import scan as run_scan
    from fmt_audit.model.loading import model_files
    from fmt_audit.model.outputs import check_output_path

    config = scan_config(**options)
    inputs = [*model_files(model), data]
    refuse_html_to_stdout(html_path)
    for path in (output, html_path):
        if path and path != STDOUT:
            check_output_path(path, inputs=inputs)
    runner = None
    if use_ray:
        from fmt_audit.fleet.ray_engine import ray_runner

        runner = ray_runner(address, workers)
    elif address or workers is not None:
        from fmt_audit.errors import ConfigError

        raise ConfigError("--address and --workers go with --ray")
    bar = progress(ctx)
    report = run_scan(model, data, config, progress=bar, runner=runner)
    if bar:
        bar.close()
    if output:
        write_report(output, report.to_json())
    if html_path:
        from fmt_audit.report.html_report import scan_html

        write_report(html_path, scan_html(report))
    say(ctx, report.format_text(), json_to_stdout=output == STDOUT)
    reason = report.attention() if fail_on_suspicious else None
    if reason:
        from .main import EXIT_SUSPICIOUS

        click.echo(reason, err=True)
        ctx.exit(EXIT_SUSPICIOUS)


def refuse_html_to_stdout(html_path: str | None) -> None:
    from fmt_audit.errors import ConfigError

    if html_path == STDOUT:
        raise ConfigError("--html needs a file path (stdout is for the JSON report: --json -)")
