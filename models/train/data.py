"""The training data: scikit-learn's 1,797 handwritten 8x8 digits as 64x64 RGB images, and captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d} is the digit as a word ("seven") or a numeral ("7"): every template is used with both, so
# "number 7", "seven", "the digit 7" and "a handwritten seven" are all training captions.
CAPTION_TEMPLATES = (
    "{d}",
    "number {d}",
    "the number {d}",
    "digit {d}",
    "the digit {d}",
    "a digit {d}",
    "a handwritten {d}",
    "handwritten digit {d}",
    "a handwritten digit {d}",
    "an image of a {d}",
    "a picture of the number {d}",
    "a drawing of a {d}",
)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (N, 3, size, size) float32 in [-1, 1] (grey in all three channels), labels (N,) long."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    return grey.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


def captions_for(digit: int) -> list[str]:
    """Every training caption of one digit: each template with the word and with the numeral."""
    return [t.format(d=name) for t in CAPTION_TEMPLATES for name in (DIGIT_WORDS[digit], str(digit))]


def to_digit_pixels(images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> (B, 64) grey 8x8 in the dataset's 0..16 range, area-downscaled:
    the form the digit classifier of bench/quality.py reads."""
    grey = F.interpolate(images.float().mean(1, keepdim=True), size=(8, 8), mode="area")
    return (grey.clamp(0, 1) * 16).flatten(1)
