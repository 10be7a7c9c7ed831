"""trapedge runtime: SpeciesNet and hierarchical re-classification over ONNX Runtime, without torch."""

__version__ = "0.1.0"

__all__ = ["__version__"]
