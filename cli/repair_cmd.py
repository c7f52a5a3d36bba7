"""``fmt-audit repair MODEL --data CLEAN -o REPAIRED.onnx``: scan, remove, fine-tune, write back, verify."""

from __future__ import annotations

import click

from .config_file import config_option
from .console import STDOUT, progress, say, verbosity, write_report
from .scan_cmd import DATA_HELP, parse_eps, refuse_html_to_stdout, scan_config, scan_options

# The repair settings ``repair`` and ``compare`` share (``repair_config`` turns them into a RepairConfig).
REPAIR_OPTIONS = [
    click.option("--prune-drop", type=float, default=0.05, show_default=True,
                 help="--method fp: prune until clean accuracy has dropped by this much."),
    click.option("--clp-u", type=float, default=3.0, show_default=True,
                 help="--method clp: prune channels above mean + u * std of their layer's Lipschitz bounds."),
    click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs (0: removal only)."),
    click.option("--lr", type=float, default=0.01, show_default=True,
                 help="Initial SGD learning rate (cosine to 1e-4)."),
    click.option("--batch-size", type=int, default=None,
                 help="Fine-tuning batch size.  [default: 256, or about ten steps per epoch on small data sets]"),
    click.option("--no-augment", is_flag=True, help="Fine-tune without random crops and flips."),
    click.option("--flip", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                 help="Horizontal-flip augmentation; auto: only if the model reads mirrored images as well."),
    click.option("--allow-regrowth", is_flag=True,
                 help="Let removed channels train again (the reference code's behaviour, for comparison)."),
    click.option("--unlearn/--no-unlearn", default=None,
                 help="--method fmt: also fine-tune on feature-map perturbations with their true labels.  "
                      "[default: on, off under --preset paper]"),
    click.option("--unlearn-eps", default="auto", show_default=True,
                 help="L-inf radius of those perturbations in [0,1] pixel space; auto: the scan's calibrated eps."),
    click.option("--holdout", type=float, default=0.1, show_default=True,
                 help="Share of the clean data kept out of scanning and training, to measure accuracy."),
]
METHOD_HELP = ("fmt: feature map testing, remove, fine-tune; ft: fine-tuning alone; fp: Fine-Pruning (the last "
               "Conv layer's dormant channels, then fine-tuning); clp: Channel Lipschitzness-based Pruning "
               "(data-free, no fine-tuning).")


def repair_options(command):
    for option in reversed(REPAIR_OPTIONS):
        command = option(command)
    return command


def repair_config(seed: int, prune_drop: float, clp_u: float, epochs: int, lr: float, batch_size: int | None,
                  no_augment: bool, flip: str, allow_regrowth: bool, unlearn: bool | None, unlearn_eps: str,
                  holdout: float, method: str = "fmt"):
    """A RepairConfig from the repair options (fmt_audit.repair.pipeline.repair_config validates them)."""
    from fmt_audit.repair.pipeline import repair_config as build

    return build(seed, method, epochs=epochs, lr=lr, batch_size=batch_size, augment=not no_augment, flip=flip,
                 allow_regrowth=allow_regrowth, unlearn=unlearn, unlearn_eps=parse_eps(unlearn_eps, "--unlearn-eps"),
                 holdout=holdout, prune_drop=prune_drop, clp_u=clp_u)


def split_options(options: dict) -> tuple[dict, dict]:
    """(the scan options, the repair options: repair_config's parameters) of a command taking both."""
    import inspect

    names = [name for name in inspect.signature(repair_config).parameters if name not in ("seed", "method")]
    repair = {name: options.pop(name) for name in names}
    return options, repair


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@scan_options(data_help=f"{DATA_HELP} Required, except with --method clp (data-free; with data, it only "
                        "measures accuracy).")
@config_option
@click.option("--method", type=click.Choice(["fmt", "ft", "fp", "clp"]), default="fmt", show_default=True,
              help=METHOD_HELP)
@repair_options
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Write the repaired ONNX model here (never the input file).")
@click.option("--from-report", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Remove the channels flagged in this scan report (from `fmt-audit scan -o`) instead of scanning.")
@click.option("--report", "--json", "report_path", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Write the repair report (JSON) here ('-': to stdout, the summary then goes to stderr).")
@click.option("--html", "html_path", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Also write a self-contained HTML report (removed channels, accuracy, training curve, scan).")
@click.pass_context
def repair(ctx: click.Context, model: str, data: str | None, method: str, output: str, from_report: str | None,
           report_path: str | None, html_path: str | None, **options) -> None:
    """Remove MODEL's backdoor channels (by --method), fine-tune it on clean data, and write the repaired model."""
    from fmt_audit.model.loading import model_files
    from fmt_audit.model.outputs import check_output_path, write_model
    from fmt_audit.repair.pipeline import repair as run_repair
    from fmt_audit.report.json_report import ScanReport

    scan_settings, repair_settings = split_options(options)
    config = scan_config(**scan_settings)
    settings = repair_config(config.seed, method=method, **repair_settings)
    inputs = [*model_files(model), *([data] if data else []), *([from_report] if from_report else [])]
    check_output_path(output, inputs=inputs)
    check_output_path(f"{output}.data", inputs=inputs)   # where a repaired model past 2 GiB keeps its weights
    refuse_html_to_stdout(html_path)
    for path in (report_path, html_path):
        if path and path != STDOUT:
            check_output_path(path, inputs=[*inputs, output])
    flagged = ScanReport.read(from_report) if from_report else None
    if flagged is not None:
        config = inherit_preprocessing(config, flagged)
    bar = progress(ctx)
    result = run_repair(model, data, settings, config, flagged=flagged, progress=bar,
                        on_epoch=_echo_epoch if bar or verbosity(ctx) > 0 else None)
    if bar:
        bar.close()
    result.report.record_output(output, write_model(output, result.model))
    if report_path:
        write_report(report_path, result.report.to_json())
    if html_path:
        from fmt_audit.report.html_report import repair_html

        # the scan run here, or the one the channels came from (--from-report)
        write_report(html_path, repair_html(result.report, result.scan or flagged))
    say(ctx, f"{result.report.format_text()}\nwrote {output}", json_to_stdout=report_path == STDOUT)


def _echo_epoch(record) -> None:
    held = "" if record.holdout_accuracy is None else f", holdout accuracy {record.holdout_accuracy:.4f}"
    click.echo(f"epoch {record.epoch}: loss {record.loss:.4f}, train accuracy {record.accuracy:.4f}{held}", err=True)


def inherit_preprocessing(config, report):
    """The scan report's --mean/--std when none are given; refuse different ones (the channels were
    chosen on the model fed that way)."""
    from dataclasses import replace

    from fmt_audit.errors import ConfigError

    saved = (report.config.get("mean"), report.config.get("std"))
    saved = tuple(tuple(v) if v else None for v in saved)
    if config.mean is None and saved[0] is not None:
        return replace(config, mean=saved[0], std=saved[1])
    if (config.mean, config.std) != saved:
        raise ConfigError(f"--mean/--std differ from the scan report's ({saved[0]}, {saved[1]}); "
                          "give the same values or leave them out")
    return config
