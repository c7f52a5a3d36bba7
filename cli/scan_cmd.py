"""``fmt-audit scan MODEL --data DATA``: feature map testing of every Conv channel."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Clean labelled images: .npz (x, y) or an image folder root/<class>/*.")
@click.option("--samples", default=256, show_default=True, help="Number of clean images to test with.")
@click.option("--eps", default=0.06, show_default=True, help="L-inf radius in [0,1] pixel space.")
@click.option("--alpha", default=0.02, show_default=True, help="Signed-gradient step (candidates: alpha, 2*alpha).")
@click.option("--selection", type=click.Choice(["outlier", "kmeans"]), default="outlier", show_default=True,
              help="outlier: robust z-score within each layer; kmeans: the paper's 2-means rule.")
@click.option("--skip-layers", default=None, help="Regular expression of Conv node names not to test.")
@click.option("--mean", default=None, help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465.")
@click.option("--std", default=None, help="Per-channel std the model expects.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", default=None, type=click.Path(path_type=str), help="Write the JSON report here.")
def scan(model: str, data: str, samples: int, eps: float, alpha: float, selection: str, skip_layers: str | None,
         mean: str | None, std: str | None, device: str, seed: int, output: str | None) -> None:
    """Test every Conv channel of MODEL and flag the suspicious ones."""
    from fmt_audit.data import parse_channel_values
    from fmt_audit.outputs import check_output_path, write_atomic
    from fmt_audit.scan import ScanConfig
    from fmt_audit.scan import scan as run_scan

    config = ScanConfig(samples=samples, eps=eps, alpha=alpha, selection=selection, skip_layers=skip_layers,
                        mean=parse_channel_values(mean, "--mean"), std=parse_channel_values(std, "--std"),
                        device=device, seed=seed)
    if output:
        check_output_path(output, inputs=[model, data])
    progress = _progress_bar() if sys.stderr.isatty() else None
    report = run_scan(model, data, config, progress=progress)
    if progress:
        click.echo("", err=True)
    if output:
        write_atomic(output, report.to_json().encode())
    click.echo(report.format_text())


def _progress_bar():
    def show(layer: str, done: int, total: int) -> None:
        click.echo(f"\rtesting channels {done}/{total} ({layer})\x1b[K", err=True, nl=False)

    return show
