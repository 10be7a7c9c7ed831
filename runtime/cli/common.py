"""What every command shares: the console, one-line errors, the choices as enums, and the station config file."""

from __future__ import annotations

import difflib
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

from ..models.backends import DEVICES, PRECISIONS
from ..outputs.images import PRIVACY
from ..reclassify.runner import CENTROID_SOURCES
from ..reclassify.stages import DECISIONS, SCORING
from ..station import FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

console = Console(stderr=True)


class UserError(Exception):
    """An expected failure: printed as one line naming the file or option and the problem, exit code 2."""


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Device = _choices("Device", DEVICES)
Precision = _choices("Precision", PRECISIONS)
Decision = _choices("Decision", DECISIONS)
Scoring = _choices("Scoring", SCORING)
Centroids = _choices("Centroids", CENTROID_SOURCES)
Format = _choices("Format", FORMATS)
Privacy = _choices("Privacy", PRIVACY)


def value(choice: Any) -> Any:
    """The plain value of an enum choice (None and plain values pass through)."""
    return choice.value if isinstance(choice, Enum) else choice


def say(message: str) -> None:
    """A line on stderr, no markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


# Keys a station config may hold: the settings a technician would otherwise type for every card.
STATION_KEYS = (
    "bundle", "country", "admin1", "geofence", "timezone", "lat", "lon", "deployment_id",
    "device", "precision", "threads", "workers", "detector_batch", "classifier_batch", "draft", "agreement_floor",
    "decision", "target_precision", "centroids", "burst_gap", "privacy",
    "detection_threshold_for_classification", "max_classifications_per_image",
)

CONFIG_HELP = "Station config (TOML): defaults for bundle, location, deployment and speed options; flags win."


def read_config(path: Optional[Path]) -> dict[str, Any]:
    """The station config's settings (keys as option names, dashes or underscores), refused with the reason."""
    if path is None:
        return {}
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the station config ({e.strerror})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from e
    raw = raw.get("station", raw) if isinstance(raw.get("station"), dict) else raw
    values = {}
    for key, setting in raw.items():
        name = key.replace("-", "_")
        if name not in STATION_KEYS:
            close = difflib.get_close_matches(name, STATION_KEYS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(STATION_KEYS)}"
            raise UserError(f"{path}: unknown setting {key!r}{hint}")
        values[name] = setting
    if "bundle" in values:
        bundle = Path(values["bundle"]).expanduser()
        values["bundle"] = str(bundle if bundle.is_absolute() else Path(path).parent / bundle)
    return values


def with_config(ctx: typer.Context, config: Optional[Path], given: dict[str, Any]) -> dict[str, Any]:
    """The command's values: a flag given on the command line, else the station config, else the default."""
    settings = read_config(config)
    params = {p.name: p for p in ctx.command.params}
    merged = dict(given)
    for name, setting in settings.items():
        if name not in params or name not in given:
            continue
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            continue
        try:
            converted = params[name].type_cast_value(ctx, setting)
        except click.BadParameter as e:
            raise UserError(f"{config}: {name}: {e.message}") from e
        merged[name] = _as_enum(given[name], converted)
    return merged


def _as_enum(default: Any, converted: Any) -> Any:
    """Typer hands enums to commands; a value read from the config becomes the same enum."""
    return type(default)(converted) if isinstance(default, Enum) else converted


def need_bundle(bundle: Optional[Path]) -> Path:
    """The bundle folder, or a one-line error saying how to give it."""
    if bundle is None:
        raise UserError("no bundle: give --bundle FOLDER or set bundle in the --config station file")
    return Path(bundle)


def bundle_option(help_text: str = "Artifact bundle folder (from `trapedge export`).", **kwargs) -> Any:
    """`--bundle/-b`, spelled the same in every command."""
    return typer.Option(None, "--bundle", "-b", help=help_text, show_default=False, **kwargs)


def export_crops_option(help_text: str, **kwargs) -> Any:
    """`--export-crops`: crops per label and thumbnails with boxes."""
    return typer.Option(False, "--export-crops", help=help_text, **kwargs)


def privacy_option(help_text: str = "People in exported images and the report: blurred, filled, or the photo "
                                    "left out; human crops are never written.", **kwargs) -> Any:
    """`--privacy blur|box|drop`, blur by default."""
    return typer.Option("blur", help=help_text, **kwargs)


def report_option(help_text: str, **kwargs) -> Any:
    """`--report/--no-report`, on by default."""
    return typer.Option(True, "--report/--no-report", help=help_text, **kwargs)


def config_option(**kwargs) -> Any:
    """`--config`, or the TRAPEDGE_CONFIG environment variable."""
    return typer.Option(None, "--config", envvar="TRAPEDGE_CONFIG", dir_okay=False, help=CONFIG_HELP,
                        show_default=False, **kwargs)
