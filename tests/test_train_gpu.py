"""The GPU training path (make gpu-pack -> make train-gpu -> make gpu-import), dry-run on CPU.

A GPU is lent only now and then; this runs the whole path here on a tiny subset so
that the GPU run cannot fail on a typo: pack 2 photos of each of 6 classes (Audi,
BMW, Chevrolet) with the served teacher's probabilities, train with EXACTLY
make train-gpu's command plus dry-run flags (argparse: the last flag wins), resume
it, check it imports no TensorFlow / Keras / other training module (the GPU machine
has none), import + export a SavedModel with brand signatures into tmp, load it
with TensorFlow and Predict on a real photo. Needs torch: make train-venv (make
test-slow does it).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASS_IDS = [12, 13, 26, 27, 54, 55]  # two Audi, two BMW, two Chevrolet classes


def make_dry(target: str, **variables: str) -> str:
    """The recipe make would run for `target`, with variables overridden."""
    env = {k: v for k, v in os.environ.items()  # not the flags of a make that runs this test, nor GPU_* overrides
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("GPU_")}
    out = subprocess.run(["make", "-s", "-n", target, *(f"{k}={v}" for k, v in variables.items())],
                         cwd=ROOT, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()
    assert len(out) == 1, out
    return out[0]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_developers_md_device_call_runs_make_train_gpu():
    """The device command in DEVELOPERS.md is make train-gpu's recipe, and carries the pack."""
    text = (ROOT / "DEVELOPERS.md").read_text()
    recipe = make_dry("train-gpu")
    assert recipe.startswith("python3 -m training.resnet_torch --pack gpu --out $OUT ")
    commands = re.findall(r'"command": "([^"]+)"', text)
    assert any(recipe in c for c in commands), (recipe, commands)
    assert '"carry": ["gpu"]' in text
    aside = re.search(r"mv serving_models (\S+)", text)  # moved out of the tree for the call, and back
    assert aside and f"mv {aside.group(1)} serving_models" in text


@pytest.mark.slow
def test_gpu_training_path_dry_run(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.fail("torch is not installed in this environment: run `make train-venv` (make test-slow does)")
    import tensorflow as tf

    # 1. the pack (make gpu-pack, on a subset)
    pack = tmp_path / "gpu"
    run([sys.executable, "-m", "training.gpu_pack", "--out", str(pack), "--class-ids", ",".join(map(str, CLASS_IDS)),
         "--limit-per-class", "2"])
    meta = json.loads((pack / "meta.json").read_text())
    labels = [c["label"] for c in meta["classes"]]
    assert [c["class_id"] for c in meta["classes"]] == CLASS_IDS
    assert meta["counts"] == {"train": 12, "val": 12}
    with np.load(pack / "train.npz", allow_pickle=False) as z:
        assert z["offsets"][-1] == len(z["jpeg"]) and len(z["offsets"]) == 13
        assert z["teacher_logp"].shape == (12, 6)
        np.testing.assert_allclose(np.exp(z["teacher_logp"].astype(np.float64)).sum(1), 1, atol=2e-2)
        assert sorted(set(z["labels"].tolist())) == list(range(6))

    # 2. make train-gpu's own command line, dry-run flags appended, on CPU
    out, ckpt = tmp_path / "out", tmp_path / "ckpt" / "last.pt"
    # bf16 autocast and channels_last as on the GPU (CPU autocast), one DataLoader worker
    dry = f"--device cpu --size 64 --batch 6 --workers 1 --amp 1 --channels-last 1 --ckpt {ckpt}"
    cmd = make_dry("train-gpu", GPU_PYTHON=sys.executable, GPU_PACK=str(pack), GPU_TRAIN_ARGS=f"{dry} --max-steps 2")
    run(["bash", "-c", cmd], env={**os.environ, "OUT": str(out)})
    history = json.loads((out / "history.json").read_text())
    assert history["step"] == 2 and history["final"] and history["classes"] == meta["classes"]
    assert history["history"][-1]["val_n"] == 12 and 0 <= history["history"][-1]["val_top1"] <= 1
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 15 * 2**20 for f in out.iterdir()), files
    assert sum(f.stat().st_size for f in out.iterdir()) < 64 * 2**20

    # ... and --resume from the device-local checkpoint (the same schedule, one more step)
    run(["bash", "-c", cmd.replace("--max-steps 2", "--max-steps 3 --resume")], env={**os.environ, "OUT": str(out)})
    history = json.loads((out / "history.json").read_text())
    assert history["step"] == 3 and len(history["commands"]) == 2

    # 3. what the GPU machine lacks is never imported
    probe = ("import sys, training.resnet_torch; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras') "
             "or (m.startswith('training.') and m != 'training.resnet_torch')]; "
             "assert not bad, bad")
    run([sys.executable, "-c", probe])

    # 4. make gpu-import (into tmp): parity, temperature, SavedModel with brand signatures, card
    base = tmp_path / "models"
    run([sys.executable, "-m", "training.resnet_keras", "import", "--weights", str(out), "--version", "1",
         "--base", str(base), "--brand-signatures"])
    export_dir = base / "global" / "1"
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["input_size"] == [64, 64, 3] and "torchvision v1.5" in card["architecture"]
    assert card["training"]["keras_vs_torch"]["max_abs_logit_diff"] < 1e-3 * max(
        1.0, card["training"]["keras_vs_torch"]["max_abs_logit"])
    assert card["training"]["command"].startswith(Path(sys.executable).name + " -m training.resnet_torch")
    assert set(card["signatures"]) == {"serving_default", "audi", "bmw", "chevrolet"}

    # 5. TensorFlow loads it and answers on a real photo
    from training.split import load_split

    photo = next(p for p in load_split() if p.split == "test" and p.class_id == CLASS_IDS[0])
    loaded = tf.saved_model.load(str(export_dir))
    answer = loaded.signatures["serving_default"](image_bytes=tf.constant([photo.path.read_bytes()]))
    probs = answer["probabilities"].numpy()
    assert probs.shape == (1, 6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert [s.decode() for s in answer["labels"].numpy()[0]] == labels
    for slug, make in (("audi", "Audi"), ("bmw", "BMW"), ("chevrolet", "Chevrolet")):
        answer = loaded.signatures[slug](image_bytes=tf.constant([photo.path.read_bytes()] * 2))
        brand_labels = [s.decode() for s in answer["labels"].numpy()[0]]
        assert brand_labels == [lab for lab in labels if lab.startswith(make + "|")] and len(brand_labels) == 2
        assert answer["probabilities"].shape == (2, 2)
        np.testing.assert_allclose(answer["probabilities"].numpy().sum(1), 1, atol=1e-5)
        assert (export_dir / "assets" / f"labels_{slug}.txt").read_text().splitlines() == brand_labels
    assert shlex.split(card["export"]["command"])[1:3] == ["-m", "training.resnet_keras"]
