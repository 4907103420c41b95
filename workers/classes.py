"""ImageNet's 1000 classes as this package ships them: their names (torchvision's) and their WordNet ids (timm's
list), both in class order. No torch: the run's planner reads them to match a labels file's class names."""

from __future__ import annotations

import importlib.resources


def imagenet_class_names() -> list[str]:
    return importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text().splitlines()


def imagenet_wnids() -> list[str]:
    """The WordNet id of each class (`n02123045`, the tabby), as ImageNet's folders are named."""
    return importlib.resources.files(__package__).joinpath("imagenet_wnids.txt").read_text().split()
