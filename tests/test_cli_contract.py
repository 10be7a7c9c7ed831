"""The command line's contract: every command ends a bad argument or path in one line and exit code 2, never a
traceback; one vocabulary (enums, --bundle everywhere); the station config; help that fits 80 columns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trapedge.runtime.cli import app, main
from trapedge.runtime.demo import build_demo_bundle, copy_samples

from test_end_to_end import lean_env


def cli(capsys, *args: str) -> tuple[int, str]:
    """Runs the CLI in-process as the console script does; returns (exit code, everything printed)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The demo bundle, a two-photo card and a finished run of it (no deployment recorded)."""
    root = tmp_path_factory.mktemp("contract")
    bundle = build_demo_bundle(root / "bundle")
    card = copy_samples(root / "card")
    for photo in sorted((card / "DCIM" / "100MEDIA").iterdir())[2:]:
        photo.unlink()
    out = root / "out"
    with pytest.raises(SystemExit) as done:
        main(["run", str(card), "--bundle", str(bundle), "--out", str(out), "--device", "cpu", "--quiet"])
    assert done.value.code == 0
    return bundle, card, out


def test_bad_arguments_and_paths_end_in_one_line_exit_2(demo, bundle: Path, tmp_path: Path, capsys) -> None:
    demo_bundle, card, out = demo
    photo = next((card / "DCIM" / "100MEDIA").iterdir())
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "bad.toml").write_text("country = [\n")
    (tmp_path / "unknown.toml").write_text('contry = "USA"\n')
    (tmp_path / "typed.toml").write_text('threads = "many"\n')
    (tmp_path / "stages.json").write_text("{not json")
    (tmp_path / "truth.csv").write_text("nonsense\n")
    no_manifest = tmp_path / "empty-bundle"
    no_manifest.mkdir()
    b = ["--bundle", str(bundle)]
    cases = [
        (["run", tmp_path / "absent", *b, "--out", tmp_path / "o"], "absent"),
        (["run", photo, *b, "--out", tmp_path / "o"], "not a folder"),
        (["run", card, *b, "--out", a_file / "o"], "file.txt"),
        (["run", card, "--out", tmp_path / "o"], "--bundle"),
        (["run", card, "--bundle", tmp_path / "absent-bundle", "--out", tmp_path / "o"], "absent-bundle"),
        (["run", card, "--bundle", no_manifest, "--out", tmp_path / "o"], "manifest"),
        (["run", card, *b, "--out", tmp_path / "o", "--device", "gpu"], "gpu"),
        (["run", card, *b, "--out", tmp_path / "o", "--engine", "tensorrt-native"], "--engine"),
        (["run", card, *b, "--out", tmp_path / "o", "--precision", "int9"], "int9"),
        (["run", card, *b, "--out", tmp_path / "o", "--precision", "int8"], "quantize"),
        (["run", card, *b, "--out", tmp_path / "o", "--country", "XXX"], "XXX"),
        (["run", card, *b, "--out", tmp_path / "o", "--country", "USA", "--admin1", "QQ"], "QQ"),
        (["run", card, *b, "--out", tmp_path / "o", "--admin1", "CA"], "--country"),
        (["run", card, *b, "--out", tmp_path / "o", "--decision", "smart"], "smart"),
        (["run", card, *b, "--out", tmp_path / "o", "--event-pooling"], "event-pooling"),
        (["run", card, *b, "--out", tmp_path / "o", "--timezone", "Mars/Base", "--lat", "1", "--lon", "2"],
         "Mars/Base"),
        (["run", card, *b, "--out", tmp_path / "o", "--timezone", "UTC"], "--lat"),
        (["run", card, *b, "--out", tmp_path / "o", "--stages-config", tmp_path / "stages.json"], "stages.json"),
        (["run", card, "--out", tmp_path / "o", "--config", tmp_path / "bad.toml"], "bad.toml"),
        (["run", card, "--out", tmp_path / "o", "--config", tmp_path / "unknown.toml"], "country"),
        (["run", card, *b, "--out", tmp_path / "o", "--config", tmp_path / "typed.toml"], "threads"),
        (["run", card, *b, "--out", tmp_path / "o", "--config", tmp_path / "absent.toml"], "absent.toml"),
        (["run", card, *b, "--out", out], "another bundle"),
        (["reclassify", tmp_path / "absent"], "absent"),
        (["reclassify", tmp_path], "results.sqlite"),
        (["reclassify", out, "--centroids", "bundle"], "centroid"),
        (["reclassify", out, "--country", "XX"], "XX"),
        (["export-results", tmp_path], "results.sqlite"),
        (["export-results", out, "--format", "xml"], "xml"),
        (["export-results", out, "--format", "camtrap-dp"], "--timezone"),
        (["export-results", out, "--timezone", "Mars/Base", "--lat", "1", "--lon", "2"], "Mars/Base"),
        (["report", tmp_path], "results.sqlite"),
        (["report", out, "--privacy", "pixelate"], "pixelate"),
        (["evaluate", tmp_path, "--truth", tmp_path / "truth.csv"], "predictions.json"),
        (["evaluate", out, "--truth", tmp_path / "absent.csv"], "absent.csv"),
        (["evaluate", out, "--truth", tmp_path / "truth.csv"], "truth.csv"),
        (["bench", tmp_path / "absent", *b, "--out", tmp_path / "bench"], "absent"),
        (["bench", card, "--out", tmp_path / "bench"], "--bundle"),
        (["check-bundle", "--bundle", no_manifest], "manifest"),
        (["check-bundle"], "--bundle"),
        (["check-bundle", bundle], "unexpected extra argument"),
        (["bundle", "update", *b, "--geofence", tmp_path / "absent.json"], "absent.json"),
        (["bundle", "update", *b], "--geofence"),
        (["bundle", "rollback", "--bundle", tmp_path / "absent-bundle"], "absent-bundle"),
        (["quantize", *b, "--model", "encoder"], "encoder"),
        (["quantize", *b, "--images", a_file], "file.txt"),
        (["quantize"], "--bundle"),
        (["engines", "build", *b, "--precision", "int9"], "int9"),
        (["engines", "build", "--bundle", demo_bundle, "--model", "head"], "head"),
        (["fit", *b], "--run"),
        (["fit", *b, "--run", tmp_path / "absent"], "absent"),
        (["export", "speciesnet", tmp_path / "absent-model", "--bundle", tmp_path / "new"], "absent-model"),
        (["export", "encoder", "--bundle", no_manifest], "manifest"),
        (["demo", "--out", a_file / "demo"], "file.txt"),
        (["export", "detector", tmp_path / "absent.pt", *b, "--model", "spruce"], "absent.pt"),
        (["export", "detector", a_file, *b, "--model", "cedar"], "cedar"),
        (["batch", tmp_path / "absent-season", *b, "--out", tmp_path / "season"], "absent-season"),
        (["batch", card, *b, "--out", tmp_path / "season", "--chunk", "0"], "--chunk"),
        (["bundle", "check", "--bundle", no_manifest], "manifest"),
        (["no-such-command"], "no-such-command"),
    ]
    swept = {tuple(str(a) for a in args[:2]) for args, _ in cases} | {(str(args[0]),) for args, _ in cases}
    assert set(_commands(app)) <= swept, set(_commands(app)) - swept
    for args, named in cases:
        code, printed = cli(capsys, *args)
        shown = " ".join(str(a) for a in args)
        assert "Traceback" not in printed, f"{shown}: {printed}"
        assert code == 2, f"{shown}: exit {code}: {printed}"
        errors = [line for line in printed.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, f"{shown}: {printed}"
        assert named.lower() in printed.lower(), f"{shown}: {named!r} not in {printed}"
    assert (tmp_path / "absent-bundle").exists() is False  # nothing was created by a refused command


def test_unexpected_error_is_one_line_and_the_traceback_is_logged(demo, monkeypatch, capsys,
                                                                 tmp_path: Path) -> None:
    bundle, card, _ = demo
    from trapedge.runtime import station

    def broken(self, *args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(station.Station, "run", broken)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    code, printed = cli(capsys, "run", card, "--bundle", bundle, "--out", tmp_path / "o", "--quiet")
    assert code == 1 and "Traceback" not in printed
    (line,) = [x for x in printed.splitlines() if x.strip()]
    assert line.startswith("Error: unexpected KeyError") and "--debug" in line
    log = Path(line.split("full traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text() and "boom" in log.read_text()
    code, printed = cli(capsys, "--debug", "run", card, "--bundle", bundle, "--out", tmp_path / "o", "--quiet")
    assert code == 1 and "Traceback" in printed


def test_unwritable_out_through_the_console_script(demo, tmp_path: Path) -> None:
    """The real entry point, lean environment: a file in the way of --out is one line, exit 2."""
    bundle, card, _ = demo
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", str(card), "--bundle", str(bundle),
                           "--out", str(blocker / "out")], capture_output=True, text=True, env=lean_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("Error: ") and str(blocker) in line


def test_station_config_fills_what_flags_leave_out(demo, tmp_path: Path, capsys) -> None:
    bundle, card, _ = demo
    config = tmp_path / "station.toml"
    relative = os.path.relpath(bundle, tmp_path)
    config.write_text(f'[station]\nbundle = "{relative}"\ntimezone = "+02:00"\nlat = -19.6\nlon = 13.9\n'
                      'deployment-id = "hoanib-07"\ndevice = "cpu"\nthreads = 1\n')
    out = tmp_path / "out"
    code, printed = cli(capsys, "run", card, "--out", out, "--config", config, "--quiet")
    assert code == 0, printed
    deployments = (out / "camtrap-dp" / "deployments.csv").read_text()
    assert "hoanib-07" in deployments and "-19.6" in deployments
    # a flag wins over the config
    code, printed = cli(capsys, "export-results", out, "--deployment-id", "hoanib-08", "--config", config)
    assert code == 0, printed
    assert "hoanib-08" in (out / "camtrap-dp" / "deployments.csv").read_text()


def test_export_results_takes_the_deployment_from_the_config(demo, tmp_path: Path, capsys) -> None:
    _, _, out = demo
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    config = tmp_path / "station.toml"
    config.write_text('timezone = "Africa/Windhoek"\nlat = -22.5\nlon = 17.1\ndeployment_id = "from-config"\n')
    code, printed = cli(capsys, "export-results", copy, "--format", "camtrap-dp", "--config", config)
    assert code == 0, printed
    assert "from-config" in (copy / "camtrap-dp" / "deployments.csv").read_text()


def test_reclassify_reads_the_bundle_the_run_recorded(demo, tmp_path: Path, capsys) -> None:
    _, _, out = demo
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    code, printed = cli(capsys, "reclassify", copy)
    assert code == 0, printed
    assert "re-classification:" in printed
    assert json.loads((copy / "predictions.json").read_text())["predictions"]


def _commands(typer_app, prefix=()) -> list[tuple[str, ...]]:
    """Every command path of the app (groups expanded)."""
    import typer.main

    group = typer.main.get_command(typer_app)
    found = []

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, path + (name,))
        else:
            found.append(path)
    walk(group, prefix)
    return found


def test_every_option_has_help_and_the_bundle_is_spelled_one_way() -> None:
    import typer.main

    group = typer.main.get_command(app)
    for path in _commands(app):
        command = group
        for name in path:
            command = command.commands[name]
        assert command.help, f"{' '.join(path)} has no help"
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{' '.join(path)} {param.opts} has no help text"
            if param.name == "bundle":
                assert param.param_type_name == "option" and "--bundle" in param.opts, f"{' '.join(path)}"
            assert param.name not in ("engine", "floor", "fp32", "batch", "margin") or " ".join(path) == "run" \
                and param.name == "margin", f"{' '.join(path)} still has --{param.name}"


def test_help_fits_an_80_column_terminal() -> None:
    env = {**lean_env(), "COLUMNS": "80", "TERM": "dumb"}
    for path in [(), *_commands(app)]:
        proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", *path, "--help"], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        width = max(len(line) for line in proc.stdout.splitlines())
        assert width <= 80, f"{' '.join(path)} --help is {width} columns wide"
    run_help = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", "--help"], capture_output=True,
                              text=True, env=env).stdout
    for panel in ("Input", "Location and deployment", "Speed", "Re-classification", "Output"):
        assert panel in run_help
