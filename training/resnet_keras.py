"""torchvision's ResNet50 (v1.5) in Keras, its weights from training.resnet_torch, and the GPU run's export.

    python -m training.resnet_keras check [photos...]        # Keras vs PyTorch logits (random weights)
    python -m training.resnet_keras check --weights W photos  # the same with a run's weights
    python -m training.resnet_keras import --weights W --version 2 --brand-signatures   # make gpu-import

The layers mirror torchvision.models.resnet50 one for one: convs without bias,
BatchNorm eps 1e-5, the stride of a bottleneck on its 3x3 conv (v1.5; Keras'
own keras.applications.ResNet50 puts it on the first 1x1 and has conv biases),
torch's symmetric padding written out as ZeroPadding2D (Keras "same" pads
stride-2 convs bottom/right only; zero-padding the max-pool is exact after the
ReLU). Layer "layer2_0_downsample_0" holds torch's "layer2.0.downsample.0".

The model has the layout training/export.py's Servable expects: layer "trunk"
(image in [-1, 1] -> 2048 global-average-pooled features) and Dense layer "head".
Input: training.data.preprocess's output, which is what resnet_torch trained on.

`import` reassembles the weight parts a GPU run brought back (history.json
checks their sha256), loads them, checks Keras against PyTorch on val photos
(needs torch: make train-venv), then hands the model to training.export's
export_model: temperature fitted on val, SavedModel with one signature per
brand plugin over the one trunk, every signature measured, model card.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import keras
import numpy as np

from training.resnet_torch import LAYERS, read_weights

BN_EPSILON = 1e-5
ARCHITECTURE = ("ResNet50 (torchvision v1.5 layout: stride on the 3x3 conv, no conv biases) trained from random init "
                "on a GPU (the card's training.machine names it), distilled from efficientnet_lite0; rebuilt in Keras by "
                "training.resnet_keras + Dense(C, softmax)")


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, bn_name: str, pad: int = 0):
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, kernel, stride, padding="valid", use_bias=False, name=name)(x)
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)


def _bottleneck(x, planes: int, stride: int, downsample: bool, name: str):
    identity = x
    if downsample:
        identity = _conv_bn(x, planes * 4, 1, stride, f"{name}_downsample_0", f"{name}_downsample_1")
    out = keras.layers.ReLU(name=f"{name}_relu1")(_conv_bn(x, planes, 1, 1, f"{name}_conv1", f"{name}_bn1"))
    out = keras.layers.ReLU(name=f"{name}_relu2")(
        _conv_bn(out, planes, 3, stride, f"{name}_conv2", f"{name}_bn2", pad=1))
    out = _conv_bn(out, planes * 4, 1, 1, f"{name}_conv3", f"{name}_bn3")
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([out, identity]))


def build_trunk(size: int) -> keras.Model:
    image = keras.Input([size, size, 3], name="image")
    x = keras.layers.ReLU(name="relu")(_conv_bn(image, 64, 7, 2, "conv1", "bn1", pad=3))
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, name="maxpool")(x)
    for i, (blocks, planes) in enumerate(zip(LAYERS, (64, 128, 256, 512))):
        for j in range(blocks):
            x = _bottleneck(x, planes, (1 if i == 0 else 2) if j == 0 else 1, j == 0, f"layer{i + 1}_{j}")
    return keras.Model(image, keras.layers.GlobalAveragePooling2D(name="avgpool")(x), name="trunk")


def build_model(size: int, num_classes: int) -> keras.Model:
    """Layer "trunk" + Dense softmax "head" (what training.export reads)."""
    inputs = keras.Input((size, size, 3), name="image")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(
        build_trunk(size)(inputs))
    return keras.Model(inputs, outputs, name=f"resnet50_tv_{num_classes}")


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy a torchvision-layout ResNet50 state_dict (numpy, any float dtype) into the model.

    Raises ValueError on any missing, unused or mis-shaped weight.
    """
    state = {k: np.asarray(v, np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    used = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"weight {key} missing from the state_dict")
        used.add(key)
        return state[key]

    for layer in model.get_layer("trunk").layers:
        key = layer.name.replace("_", ".")
        try:
            if isinstance(layer, keras.layers.Conv2D):
                layer.set_weights([take(f"{key}.weight").transpose(2, 3, 1, 0)])  # OIHW -> HWIO
            elif isinstance(layer, keras.layers.BatchNormalization):
                layer.set_weights([take(f"{key}.{s}") for s in ("weight", "bias", "running_mean", "running_var")])
        except ValueError as e:
            raise ValueError(f"{layer.name}: {e}") from e
    model.get_layer("head").set_weights([take("fc.weight").T, take("fc.bias")])
    unused = set(state) - used
    if unused:
        raise ValueError(f"weights not loaded: {sorted(unused)[:5]}")


def keras_logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    head = model.get_layer("head")
    return model.get_layer("trunk").predict(x, verbose=0) @ head.kernel.numpy() + head.bias.numpy()


def torch_logits(state: dict[str, np.ndarray], x: np.ndarray, impl: str = "auto") -> np.ndarray:
    """The PyTorch reference (training.resnet_torch's model, eval mode, float32) on NHWC inputs."""
    import torch

    from training.resnet_torch import build_model as build_torch

    num_classes = state["fc.bias"].shape[0]
    net, _ = build_torch(num_classes, impl)
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()},
                                              strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"state_dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def random_state(num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A torch ResNet50 state_dict with every weight random and non-trivial (BatchNorm scales,
    shifts and running statistics too: the zero-initialised residual branches would hide errors)."""
    import torch

    from training.resnet_torch import ResNet50

    torch.manual_seed(seed)
    net = ResNet50(num_classes, zero_init_residual=False)
    state = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")) or k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bias", "running_mean")):
            v = 0.1 * torch.randn(v.shape, generator=g)
        state[k] = v.numpy().copy()
    return state


def parity(state: dict[str, np.ndarray], photos: list, size: int) -> dict:
    """Keras vs PyTorch logits on real photos preprocessed by training.data.preprocess (both float32)."""
    import tensorflow as tf

    from training.data import preprocess

    x = np.stack([preprocess(tf.constant(Path(p).read_bytes()), size).numpy() for p in photos])
    model = build_model(size, state["fc.bias"].shape[0])
    load_torch_state(model, state)
    k, t = keras_logits(model, x), torch_logits(state, x)
    return {"max_abs_logit_diff": float(np.abs(k - t).max()), "max_abs_logit": float(np.abs(t).max()),
            "top1_agreement": float(np.mean(k.argmax(1) == t.argmax(1))), "n": len(photos), "size": size}


def import_run(weights: Path, version: int, model_name: str = "global", base: str = "serving_models",
               brand_signatures: bool = True, force: bool = False, argv: list[str] | None = None,
               parity_photos: int = 4, arch: str | None = None) -> tuple[Path, dict]:
    """arch None: a training.resnet_torch run (weights.part*.npz); "resnet50": that network of a
    training.gpu_train run (resnet50.part*.npz)."""
    from training import data
    from training.export import export_model
    from training.gpu_train import read_network, training_record
    from dataset.split import load_split

    t0 = time.time()
    if arch:
        state, history = read_network(Path(weights), arch)
    else:
        history = json.loads((Path(weights) / "history.json").read_text())
        state = read_weights(Path(weights))
    classes = [data.ClassInfo(c["class_id"], c["make"], c["model"], c["year"]) for c in history["classes"]]
    size = history["preprocessing"]["size"]
    model = build_model(size, len(classes))
    load_torch_state(model, state)
    index = {c.class_id for c in classes}
    val = [p.path for p in load_split() if p.split == "val" and p.class_id in index][:parity_photos]
    check = parity(state, val, size)
    print(f"Keras vs PyTorch on {check['n']} val photos: max |logit diff| {check['max_abs_logit_diff']:.2e} "
          f"(max |logit| {check['max_abs_logit']:.1f}), top-1 agreement {check['top1_agreement']:.2f}", flush=True)
    if check["max_abs_logit_diff"] > 1e-2 * max(1.0, check["max_abs_logit"]):
        raise SystemExit("the Keras replica does not match the PyTorch model: not exporting")
    if arch:
        training = {**training_record(history, arch), "keras_vs_torch": check}
    else:
        training = resnet_torch_record(history, check)
    preprocessing = {**data.PREPROCESSING, "size": size, "training_augmentation": history["preprocessing"]["train"]}
    return export_model(
        model, classes, size, model_name=model_name, version=version, base=base,
        brand_signatures=brand_signatures, force=force, architecture=ARCHITECTURE, preprocessing=preprocessing,
        scope="all classes" if len(classes) == 196 else f"{len(classes)} classes (a dry run's subset)",
        trained_split_hash=history["split_hash"], training=training,
        command=shlex.join([Path(sys.executable).name, "-m", "training.resnet_keras", *(argv or sys.argv[1:])]),
        t0=t0)


def resnet_torch_record(history: dict, check: dict) -> dict:
    """What a model card says about a training.resnet_torch run."""
    rows = history["history"]
    return {
        "command": history["command"],
        "commands": history["commands"],
        "config": history["args"],
        "epochs": history["epoch"],
        "steps": history["step"],
        "history": rows,
        "train_seconds": history["train_seconds"],
        "machine": history["machine"],
        "model": history["model"],
        "teacher": history["teacher"],
        "pack": {"encoding": history["pack"], "counts": history["counts"]},
        "finished_schedule": history["final"],
        "keras_vs_torch": check,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="Keras vs PyTorch logits on photos")
    c.add_argument("--weights", default=None, help="a GPU run's weights folder (default: random weights)")
    c.add_argument("--size", type=int, default=224)
    c.add_argument("photos", nargs="*")
    i = sub.add_parser("import", help="export a GPU run's weights as a SavedModel")
    i.add_argument("--weights", required=True, help="folder with weights.part*.npz + history.json")
    i.add_argument("--arch", default=None, choices=("resnet50",),
                   help="read that network of a training.gpu_train run (default: a training.resnet_torch run)")
    i.add_argument("--version", type=int, required=True)
    i.add_argument("--model-name", default="global")
    i.add_argument("--base", default="serving_models")
    i.add_argument("--brand-signatures", action="store_true")
    i.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.command == "check":
        from dataset.split import load_split

        photos = args.photos or [p.path for p in load_split() if p.split == "val"][:4]
        if args.weights:
            state = read_weights(Path(args.weights))
            size = json.loads((Path(args.weights) / "history.json").read_text())["preprocessing"]["size"]
        else:
            state, size = random_state(196), args.size
        print(json.dumps(parity(state, photos, size)))
    else:
        import_run(Path(args.weights), args.version, args.model_name, args.base, args.brand_signatures, args.force,
                   argv, arch=args.arch)


if __name__ == "__main__":
    main()
