"""The `trapedge` command line: thin parse-and-call over `trapedge.runtime.station`; errors end in one line."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Optional

import click
import typer

from .. import __version__
from ..models.backends import BackendError
from . import batch, bundle, card
from .common import UserError, say

__all__ = ["app", "main"]

logger = logging.getLogger("trapedge")

app = typer.Typer(help="Camera-trap photos to species on the edge: SpeciesNet and hierarchical re-classification "
                       "on ONNX Runtime and TensorRT.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"max_content_width": 100})
export_app = typer.Typer(help="Convert models to a trapedge artifact bundle (needs the export extra).",
                         no_args_is_help=True)
bundle_app = typer.Typer(help="Update a bundle's geofence and taxonomy without re-exporting, or roll back.",
                         no_args_is_help=True)
engines_app = typer.Typer(help="TensorRT engines for this GPU (needs TensorRT and a CUDA GPU).", no_args_is_help=True)

app.command("run")(card.run)
app.command("reclassify")(card.reclassify_cmd)
app.command("export-results")(card.export_results)
app.command("report")(card.report_cmd)
app.command("evaluate")(card.evaluate_cmd)
app.command("bench")(card.bench)
app.command("demo")(card.demo)
app.command("batch")(batch.batch)
app.command("check-bundle")(bundle.check)
app.command("quantize")(bundle.quantize)
app.command("fit")(bundle.fit)
bundle_app.command("update")(bundle.update)
bundle_app.command("rollback")(bundle.rollback)
bundle_app.command("check")(bundle.check)
engines_app.command("build")(bundle.engines_build)
export_app.command("speciesnet")(bundle.export_speciesnet)
export_app.command("encoder")(bundle.export_encoder)
export_app.command("detector")(bundle.export_detector)
app.add_typer(export_app, name="export")
app.add_typer(bundle_app, name="bundle")
app.add_typer(engines_app, name="engines")

_debug = False


def _version(show: bool) -> None:
    if show:
        print(f"trapedge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an unexpected error."),
) -> None:
    """trapedge: field-station runtime for SpeciesNet and hierarchical re-classification."""
    global _debug
    _debug = debug
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # the terminal gets warnings; OUT/trapedge.log gets INFO as well


EXPECTED = (UserError, ValueError, BackendError, OSError, sqlite3.Error)


def _one_line(error: BaseException) -> str:
    """An expected error as one line: an OSError as 'file: reason', anything else as its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _log_file() -> Path:
    """Where the traceback goes: the run's own trapedge.log when a command opened one, else the user's state dir."""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "trapedge"
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError:
        import tempfile

        state = Path(tempfile.gettempdir())
    return state / "trapedge.log"


def _record(error: BaseException) -> Path:
    """Appends the traceback to the log file and returns its path."""
    path = _log_file()
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        with open(path, "a", encoding="utf-8") as fp:
            fp.write(f"trapedge {__version__}: {' '.join(sys.argv)}\n{text}\n")
    except OSError:
        pass
    return path


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point: expected failures exit 2 with one line, unexpected ones 1 with the log path."""
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback of its own
    try:
        code = app(args=args, standalone_mode=False)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        say("Aborted.")
        sys.exit(130)
    except KeyboardInterrupt:
        say("Interrupted; what was committed is kept: run the same command again to resume.")
        sys.exit(130)
    except EXPECTED as e:
        _record(e)
        say(f"Error: {_one_line(e)}")
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no user ever sees a traceback
        path = _record(e)
        if _debug:
            traceback.print_exception(type(e), e, e.__traceback__)
        say(f"Error: unexpected {type(e).__name__}: {_one_line(e)} (full traceback in {path}; --debug shows it)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
