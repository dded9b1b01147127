"""`tritnet`: the click application behind the console script."""

from __future__ import annotations

import json
import sys

import click

import tritnet


class DeviceChoice(click.Choice):
    def __init__(self):
        super().__init__(["auto", "cpu", "cuda"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tritnet.__version__, prog_name="tritnet")
def main():
    """tritnet: train true-ternary neural networks (packed trits, integer state, no float weights)."""


@main.command()
@click.option("--device", type=DeviceChoice(), default=None,
              help="Device to report on (default: TRITNET_DEVICE or the best available).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
def info(device, as_json):
    """Print the backend, the device and library versions."""
    from tritnet import backend
    try:
        if device is not None:
            backend.set_device(device)
        facts = {"tritnet": tritnet.__version__, "python": sys.version.split()[0], **backend.describe()}
    except backend.DeviceError as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps(facts))
    else:
        for k, v in facts.items():
            click.echo(f"{k:>12}: {v}")


@main.command()
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Preset to trace: tiny, small or default.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="A JSON or TOML config file (overrides the preset).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
def trace(preset_name, config_path, as_json):
    """Count the logical trits of a model per component, allocating nothing."""
    from tritnet.config import ConfigError, load_config, preset, trace as run_trace
    try:
        config = preset(preset_name)
        if config_path:
            config = load_config(config_path, base=config)
    except ConfigError as e:
        raise click.ClickException(str(e))
    report = run_trace(config)
    if as_json:
        click.echo(json.dumps({"components": report.components, "total": report.total,
                               "state_bytes": report.state_bytes, "seconds": report.seconds}))
    else:
        click.echo(report.format())


if __name__ == "__main__":  # pragma: no cover
    main()
