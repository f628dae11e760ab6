"""A synthetic ImageNet-shaped ImageFolder tree for tests: 1,000 class folders of tiny JPEGs (fast to make).

Each image is a flat colour that encodes its (split, class, index), so a test can tell images apart
after a round trip; class folder names look like ImageNet's WordNet ids (``n00000000`` ...)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

IMAGENET_CLASSES = 1000


def class_name(label: int) -> str:
    return f"n{label:08d}"


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    colour = ((seed * 37) % 256, (seed * 101) % 256, (seed * 13) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_image_folder(root: Path, splits: dict[str, int], classes: int = IMAGENET_CLASSES) -> Path:
    """``root/<split>/<class>/<i>.JPEG`` with ``splits[split]`` images per class; returns ``root``."""
    seed = 0
    for split, per_class in splits.items():
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{split}_{label}_{i}.JPEG").write_bytes(jpeg_bytes(seed))
                seed += 1
    return root
