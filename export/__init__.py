"""trapedge export: SpeciesNet and encoders from torch to ONNX artifact bundles (workstation side)."""
