"""Imported at start-up when this folder is on PYTHONPATH (``device_check.sh --dry-run``): makes ``ray``,
``mlflow`` and ``pydantic`` unimportable, as on the device machine (which has torch, numpy, scipy, pyarrow,
pyyaml, tqdm, pillow, matplotlib, torchvision, triton and no Ray or MLflow), so a dry run here proves that
the device scripts need none of them."""

import importlib.abc
import sys

ABSENT = ("ray", "mlflow", "pydantic")


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the device machine)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
