"""trapedge runtime: SpeciesNet and hierarchical re-classification over ONNX Runtime, without torch.

The library face lives in `trapedge.runtime.station` and is re-exported here on first use:
`Station`, `RunReport`, `open_bundle`, `rerun_pass_two`, `write_outputs`, `FORMATS`.
"""

__version__ = "0.1.0"

_STATION = ("FORMATS", "RunReport", "Station", "open_bundle", "rerun_pass_two", "write_outputs")

__all__ = ["__version__", *_STATION]


def __getattr__(name: str):
    """Imports the station module only when its names are asked for, so `--version` stays instant."""
    if name in _STATION:
        from . import station

        return getattr(station, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
