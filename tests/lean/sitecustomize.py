"""Makes torch, torchvision, open_clip and speciesnet unimportable, to prove the runtime is lean."""

import sys

_BLOCKED = ("torch", "torchvision", "open_clip", "speciesnet", "yolov5", "ultralytics", "onnx2torch")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ImportError(f"{name} is blocked in the lean-runtime test")
        return None


sys.meta_path.insert(0, _Blocker())
