"""The GPU jobs (make gpu-pack -> make train-gpu -> make gpu-import, JOB=lite|resnet50|resnet50-v1), dry-run on CPU.

A GPU is lent only now and then; this runs each job's whole path here on a tiny
subset so that the GPU run cannot fail on a typo: pack 2 photos of each of 6
classes (Audi, BMW, Chevrolet) with the served teacher's probabilities (and, for
`lite`, the ImageNet trunks), train with EXACTLY make train-gpu's command plus
dry-run flags (argparse: the last flag wins), check it imports no TensorFlow /
Keras / training module the GPU machine cannot run, import + export a SavedModel
with brand signatures into tmp with make gpu-import's command, load it with
TensorFlow and Predict on a real photo. Needs torch: make train-venv (make
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
JOBS = ("lite", "resnet50", "resnet50-v1")
# what may be imported on the GPU machine (torch, numpy, PIL and these training modules only)
GPU_MODULES = {"training", "training.gpu_train", "training.resnet_torch", "training.lite_torch", "training.lite_arch"}


def make_dry(target: str, **variables: str) -> str:
    """The recipe make would run for `target`, with variables overridden."""
    env = {k: v for k, v in os.environ.items()  # not the flags of a make that runs this test, nor GPU_* overrides
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("GPU_")}
    out = subprocess.run(["make", "-s", "-n", target, *(f"{k}={v}" for k, v in variables.items())],
                         cwd=ROOT, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()
    return out[-1]  # the target's own recipe line (prerequisites, when out of date, come first)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.parametrize("job", ["lite", "resnet50"])
def test_developers_md_device_call_runs_make_train_gpu(job):
    """DEVELOPERS.md's device command for each job is make train-gpu's recipe, and carries the job's pack."""
    text = (ROOT / "DEVELOPERS.md").read_text()
    recipe = make_dry("train-gpu", JOB=job)
    assert recipe.startswith(f"python3 -m training.gpu_train --arch ") and f"--pack gpu/{job} --out $OUT " in recipe
    calls = re.findall(r'\{"command": "([^"]+)", "carry": \["([^"]+)"\]', text)
    assert any(recipe in command and carry == f"gpu/{job}" for command, carry in calls), (recipe, calls)
    aside = re.search(r"mv serving_models (\S+)", text)  # moved out of the tree for the call, and back
    assert aside and f"mv {aside.group(1)} serving_models" in text


def test_make_refuses_an_unknown_job():
    result = subprocess.run(["make", "-s", "-n", "train-gpu", "JOB=nope"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown JOB=nope" in result.stderr


@pytest.mark.slow
def test_resnet50_v1_job_dry_run(tmp_path):
    """The first H200 run's recipe (training.resnet_torch: CPU workers decode every step), with --resume."""
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
    cmd = make_dry("train-gpu", JOB="resnet50-v1", GPU_PYTHON=sys.executable, GPU_PACK=str(pack),
                   GPU_TRAIN_ARGS=f"{dry} --max-steps 2")
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
    from dataset.split import load_split

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


@pytest.mark.slow
@pytest.mark.parametrize("job", ["lite", "resnet50"])
def test_gpu_train_job_dry_run(tmp_path, job):
    """make gpu-pack / train-gpu / gpu-import JOB=<job>, each with the Makefile's own command line."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.fail("torch is not installed in this environment: run `make train-venv` (make test-slow does)")
    import tensorflow as tf

    # 1. the pack: make gpu-pack's command on a subset (appended flags win)
    pack = tmp_path / "gpu" / job
    subset = f"--class-ids {','.join(map(str, CLASS_IDS))} --limit-per-class 2"
    run(["bash", "-c", f"{make_dry('gpu-pack', JOB=job, GPU_PACK=str(pack))} {subset}"])
    meta = json.loads((pack / "meta.json").read_text())
    assert [c["class_id"] for c in meta["classes"]] == CLASS_IDS and meta["counts"] == {"train": 12, "val": 12}
    imagenet = sorted(f.name for f in pack.glob("imagenet_*.npz"))
    assert imagenet == (["imagenet_lite0.npz", "imagenet_lite2.npz"] if job == "lite" else [])
    for name in imagenet:
        with np.load(pack / name, allow_pickle=False) as z:
            assert all(z[k].dtype == np.float16 for k in z.files) and not any(k.startswith("_fc.") for k in z.files)

    # 2. make train-gpu's own command line, dry-run flags appended, on CPU (bf16 autocast, channels_last)
    out = tmp_path / "out"
    dry = "--device cpu --size 64 --batch 6 --workers 1 --amp 1 --channels-last 1 --val-every 1 --max-steps 2"
    cmd = make_dry("train-gpu", JOB=job, GPU_PYTHON=sys.executable, GPU_PACK=str(pack), GPU_TRAIN_ARGS=dry)
    run(["bash", "-c", cmd], env={**os.environ, "OUT": str(out)})
    history = json.loads((out / "history.json").read_text())
    archs = history["args"]["arch"]
    assert history["step"] == 2 and history["final"] and history["classes"] == meta["classes"]
    assert archs == (["lite0", "lite2"] if job == "lite" else ["resnet50"])
    for arch in archs:
        last = history["networks"][arch]["history"][-1]
        assert 0 <= last["val_top1_plain"] <= 1 and 0 <= last["val_top1_framed"] <= 1
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files), files
    assert sum(f.stat().st_size for f in files) < 64 * 2**20

    # 3. what the GPU machine lacks is never imported
    probe = ("import sys, training.gpu_train, training.lite_torch; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras') "
             f"or (m.startswith('training') and m not in {sorted(GPU_MODULES)!r})]; assert not bad, bad")
    run([sys.executable, "-c", probe])

    # 4. make gpu-import's command (into tmp): parity, temperature, SavedModel with brand signatures, card
    base = tmp_path / "models"
    run(["bash", "-c", f"{make_dry('gpu-import', JOB=job, WEIGHTS=str(out), VERSION='1')} --base {base}"])
    (export_dir,) = [d for d in base.glob("*/1")]
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["input_size"] == [64, 64, 3]
    check = card["training"]["keras_vs_torch"]
    assert check["max_abs_logit_diff"] < 1e-3 * max(1.0, check["max_abs_logit"])
    assert card["training"]["command"].startswith(Path(sys.executable).name + " -m training.gpu_train")
    assert set(card["signatures"]) == {"serving_default", "audi", "bmw", "chevrolet"}

    # 5. TensorFlow loads it and answers on a real photo
    from dataset.split import load_split

    photo = next(p for p in load_split() if p.split == "test" and p.class_id == CLASS_IDS[0])
    loaded = tf.saved_model.load(str(export_dir))
    answer = loaded.signatures["serving_default"](image_bytes=tf.constant([photo.path.read_bytes()]))
    assert answer["probabilities"].shape == (1, 6)
    np.testing.assert_allclose(answer["probabilities"].numpy().sum(1), 1, atol=1e-5)
    assert [s.decode() for s in answer["labels"].numpy()[0]] == [c["label"] for c in meta["classes"]]
