"""Class names: a request may name an ImageNet class instead of giving its index."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from models.config import ModelSpec, class_index

IMAGENET_FILE = Path(__file__).with_name("imagenet_classes.json")
IMAGENET_CLASSES = 1000


@cache
def imagenet_lookup() -> dict[str, list[int]]:
    """Lower-cased name -> class indices. Readable names win over WordNet synonyms, so "crane"
    stays ambiguous (bird and machine) while "golden retriever" is one class."""
    doc = json.loads(IMAGENET_FILE.read_text())
    lookup: dict[str, list[int]] = {}
    for index, name in enumerate(doc["names"]):
        lookup.setdefault(name.lower(), []).append(index)
    synonyms: dict[str, list[int]] = {}
    for index, words in enumerate(doc["synonyms"]):
        for word in words:
            synonyms.setdefault(word.lower(), []).append(index)
    for word, indices in synonyms.items():
        lookup.setdefault(word, indices)
    return lookup


def resolve_class(value: int | str, num_classes: int, spec: ModelSpec | None = None) -> int:
    """A class index from an index, a string of digits, a name from the model's `class_names` in
    the config, or (other 1000-class models) an ImageNet name. Raises ValueError for the user."""
    if spec is not None and spec.class_names:
        return class_index(spec, value)
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    if num_classes != IMAGENET_CLASSES:
        raise ValueError(
            f"class names are known for 1000-class (ImageNet) models and models with class_names in "
            f"the config only; this model has {num_classes} classes: give an index 0..{num_classes - 1}"
        )
    indices = imagenet_lookup().get(text.lower())
    if not indices:
        raise ValueError(f"'{text}' is not an ImageNet class name: give a name or an index 0..999")
    if len(indices) > 1:
        raise ValueError(
            f"'{text}' names several ImageNet classes ({', '.join(map(str, indices))}): give the index"
        )
    return indices[0]
