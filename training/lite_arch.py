"""EfficientNet-Lite0/1/2's architecture as plain data: no TensorFlow, no torch.

The Keras port (training/efficientnet_lite.py, here) and the PyTorch model
(training/lite_torch.py, on the GPU machine, which has no TensorFlow) both build
their layers from `block_list`, so the two cannot drift apart and weights move
between them by name.

Differences from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite,
stem (32) and head (1280) widths and the first/last block repeats not scaled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# (width, depth, native resolution, dropout) from efficientnet_lite_builder.py
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}

# repeats, kernel, stride, expand ratio, in filters, out filters (Lite0 widths)
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3


@dataclass(frozen=True)
class Block:
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int
    group: int  # index into BLOCKS: the stage this block belongs to


def round_filters(filters: int, width: float) -> int:
    """The TF reference rounding: a multiple of 8, never more than 10% below."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def block_list(variant: str) -> list[Block]:
    width, depth, _, _ = VARIANTS[variant]
    blocks = []
    for group, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(BLOCKS):
        first_or_last = group in (0, len(BLOCKS) - 1)  # Lite keeps these repeats fixed
        repeats = repeats if first_or_last else int(math.ceil(depth * repeats))
        f_in = STEM_FILTERS if group == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        for i in range(repeats):
            blocks.append(Block(kernel, stride if i == 0 else 1, expand, f_in if i == 0 else f_out, f_out, group))
    return blocks


def multiply_adds(variant: str, size: int, start: int = 0, end: int | None = None, stem: bool | None = None,
                  head: bool | None = None, classes: int = 0) -> dict[str, int]:
    """Multiply-adds of the convolutions (and a `classes`-way linear head) per image at size x size,
    for blocks start..end-1, the stem (default: when start == 0) and the head conv + pooling (default:
    when end is the last block). BatchNorm, ReLU6 and the adds are left out: under 1 % of the work.
    Returns {part: multiply-adds} with "total"."""
    blocks = block_list(variant)
    end = len(blocks) if end is None else end
    stem = start == 0 if stem is None else stem
    head = end == len(blocks) if head is None else head
    res = math.ceil(size / 2)  # after the stride-2 stem
    parts = {"stem": res * res * 3 * 3 * 3 * STEM_FILTERS if stem else 0}
    for i, b in enumerate(blocks):
        hidden = b.filters_in * b.expand
        res_in, res = res, math.ceil(res / b.stride)
        if start <= i < end:
            expand = res_in * res_in * b.filters_in * hidden if b.expand != 1 else 0
            parts[f"block{i}"] = expand + res * res * b.kernel * b.kernel * hidden + res * res * hidden * b.filters_out
    if head:
        parts["head"] = res * res * blocks[-1].filters_out * HEAD_FILTERS + HEAD_FILTERS * classes
    parts["total"] = sum(parts.values())
    return parts
