"""Train classifiers on a GPU with the photos decoded ONCE into GPU memory and augmented there.

    python3 -m training.gpu_train --pack gpu/lite --out $OUT --arch lite0 --arch lite2 --minutes 7.5   # make train-gpu JOB=lite
    python -m training.gpu_train --pack /tmp/p --out /tmp/w --arch lite0 --device cpu --size 64 --max-steps 2  # dry run

Why: in the first H200 run (training.resnet_torch) the 14 CPU workers that
decode and crop every photo every epoch set the pace (the GPU waited 32-44 % of
the time). Here every packed photo is decoded once at start-up, squashed to
--size x --size (the served preprocessing squashes too) and kept on the device
as uint8; each step crops, flips, frames, jitters and erases a batch with
batched tensor ops, so nothing waits on the CPU.

Several networks (--arch, repeated) train side by side on the SAME batches, one
optimizer each, so one GPU call yields e.g. an EfficientNet-Lite0 (the cheap
candidate for the default) and a Lite2 (the accurate one). EfficientNet-Lite
starts from the ImageNet trunk packed by training.gpu_pack (imagenet_<arch>.npz,
float16, classifier dropped); ResNet50 from random init (training.resnet_torch).

Augmentation (every step, on the device):
  - random resized crop of --min-scale..1 of the area, aspect 3/4-4/3 relative to the photo, flip;
  - with probability --frame-p, the photo is placed, whole or cropped, in a larger frame: it covers
    --frame-min..1 of the width (the height in proportion, +-20 %) at a random place, on a background
    that is a random colour, smooth colour noise or another photo of the batch blurred beyond
    recognition, plus pixel noise. A loosely framed car is what a localiser's crop looks like;
  - colour jitter and random erasing (training.resnet_torch).
Loss, optimizer and the wall-clock schedule are training.resnet_torch's: label CE +
KL to the teacher's log-probabilities, SGD + Nesterov, warm-up then cosine over --minutes.

Out (--out, $OUT on the GPU machine; rewritten every --save-every-s):
    <arch>.partNN.npz  float16 state_dict per network (the wheel's keys for Lite, torchvision's for ResNet50)
    history.json       args, classes, per-network per-epoch rows (loss, val top-1 plain and framed), machine, sha256
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.resnet_torch import (Stop, _atomic_write, build_model as build_resnet, color_jitter, distillation_loss,
                                   float16_state, lr_factor, machine, make_optimizer, random_erasing, read_weights,
                                   write_weights)

VAL_FRAME = 0.7  # the framed val view: the photo covers 70 % of the width, centred, on grey


# --- photos into device memory -----------------------------------------------------------------

def _decode_squashed(job: tuple[bytes, int]) -> np.ndarray:
    blob, size = job
    img = Image.open(io.BytesIO(blob)).convert("RGB").resize((size, size), Image.BILINEAR)  # antialiased down
    return np.asarray(img, np.uint8)


def load_split(path: Path, size: int, workers: int) -> dict:
    """A packed split decoded and squashed to size x size: images uint8 [N, 3, size, size] (CPU), labels, teacher."""
    with np.load(path, allow_pickle=False) as z:
        jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"].astype(np.int64)
        teacher = z["teacher_logp"].astype(np.float32) if "teacher_logp" in z.files else None
    jobs = [(jpeg[offsets[i]: offsets[i + 1]].tobytes(), size) for i in range(len(labels))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            images = list(pool.map(_decode_squashed, jobs, chunksize=64))
    else:
        images = [_decode_squashed(j) for j in jobs]
    return {"images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.from_numpy(labels),
            "teacher": None if teacher is None else torch.from_numpy(teacher)}


# --- batched augmentation on the device --------------------------------------------------------

def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def backgrounds(x: torch.Tensor) -> torch.Tensor:
    """One background per image of x (float 0..255 [N, 3, H, W]): a random colour, smooth colour
    noise, or another photo of the batch blurred to a few blobs; pixel noise on top."""
    n, _, h, w = x.shape
    dev = x.device
    flat = torch.rand(n, 3, 1, 1, device=dev).expand(n, 3, h, w) * 255
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, device=dev) * 255, size=(h, w), mode="bicubic", align_corners=False)
    blurred = F.interpolate(F.adaptive_avg_pool2d(x.roll(1, dims=0).flip(3), 6), size=(h, w), mode="bilinear",
                            align_corners=False)
    kind = torch.randint(0, 3, (n, 1, 1, 1), device=dev)
    bg = torch.where(kind == 0, flat, torch.where(kind == 1, smooth, blurred))
    return (bg + torch.randn_like(bg) * _uniform(n, 0, 12, dev).view(n, 1, 1, 1)).clamp(0, 255)


def crop_and_frame(x: torch.Tensor, min_scale: float, frame_p: float, frame_min: float) -> torch.Tensor:
    """Random resized crop + flip, then with probability frame_p the result shrunk into a larger frame
    on a background; x float 0..255 [N, 3, S, S] -> the same shape. One affine grid per image."""
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, min_scale, 1.0, dev)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), dev))
    fw, fh = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
    cx, cy = _uniform(n, -1, 1, dev) * (1 - fw), _uniform(n, -1, 1, dev) * (1 - fh)
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    # framing: the photo covers sx of the output's width (sy of its height), centred at (ox, oy)
    framed = torch.rand(n, device=dev) < frame_p
    sx = torch.where(framed, _uniform(n, frame_min, 1.0, dev), torch.ones(n, device=dev))
    sy = (sx * _uniform(n, 0.8, 1.2, dev)).clamp(max=1)
    sy = torch.where(framed, sy, torch.ones(n, device=dev))
    ox, oy = _uniform(n, -1, 1, dev) * (1 - sx), _uniform(n, -1, 1, dev) * (1 - sy)
    # output coords o -> frame coords u = (o - offset) / s -> input coords fw * flip * u + cx
    zero = torch.zeros(n, device=dev)
    frame = torch.stack([torch.stack([1 / sx, zero, -ox / sx], 1), torch.stack([zero, 1 / sy, -oy / sy], 1)], 1)
    crop = torch.stack([torch.stack([fw * flip, zero, cx], 1), torch.stack([zero, fh, cy], 1)], 1)
    full = torch.cat([crop[:, :, :2] @ frame[:, :, :2], (crop[:, :, :2] @ frame[:, :, 2:]) + crop[:, :, 2:]], 2)
    grid = F.affine_grid(full, [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (F.affine_grid(frame, [n, 1, h, w], align_corners=False).abs() <= 1).all(dim=-1).unsqueeze(1)
    return torch.where(inside | ~framed.view(n, 1, 1, 1), out, backgrounds(x))


def frame_centred(x: torch.Tensor, fraction: float, grey: float = 128.0) -> torch.Tensor:
    """The framed val view: each photo shrunk to `fraction` of the width and height, centred, on grey."""
    n, _, h, w = x.shape
    small = F.interpolate(x, size=(round(h * fraction), round(w * fraction)), mode="bilinear", antialias=True,
                          align_corners=False)
    out = torch.full_like(x, grey)
    top, left = (h - small.shape[2]) // 2, (w - small.shape[3]) // 2
    out[:, :, top: top + small.shape[2], left: left + small.shape[3]] = small
    return out


def normalise(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x / 127.5 - 1.0  # training.data.preprocess
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --- the networks --------------------------------------------------------------------------------

def build_network(arch: str, num_classes: int, pack: Path) -> tuple[torch.nn.Module, str]:
    if arch == "resnet50":
        return build_resnet(num_classes)
    from training.lite_torch import EfficientNetLite, load_trunk

    model = EfficientNetLite(arch, num_classes)
    weights = pack / f"imagenet_{arch}.npz"
    with np.load(weights, allow_pickle=False) as z:
        load_trunk(model, {k: z[k] for k in z.files})
    return model, f"training.lite_torch.EfficientNetLite({arch!r}), ImageNet trunk from {weights.name}"


@torch.no_grad()
def evaluate(model, val: dict, args, device) -> dict:
    """Val top-1 on the plain photos and on the framed view (VAL_FRAME of the width, on grey)."""
    model.eval()
    result = {}
    for view in ("plain", "framed"):
        correct = 0
        for i in range(0, len(val["labels"]), 256):
            x = val["images"][i: i + 256].to(device).float()
            if view == "framed":
                x = frame_centred(x, VAL_FRAME)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = model(normalise(x, args.channels_last)).float()
            correct += (logits.argmax(1).cpu() == val["labels"][i: i + 256]).sum().item()
        result[f"val_top1_{view}"] = correct / max(len(val["labels"]), 1)
    model.train()
    return result


# --- what came back, read here by the importers (training.lite_import, training.resnet_keras) ------

def read_network(folder: Path, arch: str) -> tuple[dict[str, np.ndarray], dict]:
    """(the network's state_dict, sha256-checked, as numpy; the run's history.json)."""
    history = json.loads((Path(folder) / "history.json").read_text())
    if arch not in history["networks"]:
        raise SystemExit(f"{folder} has no network {arch!r}: it has {sorted(history['networks'])}")
    return read_weights(Path(folder), prefix=arch, listed=history["networks"][arch]["weights"]), history


def training_record(history: dict, arch: str) -> dict:
    """What a model card says about how the network was trained."""
    net = history["networks"][arch]
    return {"command": history["command"], "config": history["args"], "model": net["model"], "lr": net["lr"],
            "epochs": history["epoch"], "steps": history["step"], "history": net["history"],
            "train_seconds": history["train_seconds"], "machine": history["machine"], "teacher": history["teacher"],
            "pack": {"encoding": history["pack"], "counts": history["counts"]},
            "finished_schedule": history["final"]}


# --- the run -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", default="gpu/lite", help="training.gpu_pack folder")
    p.add_argument("--out", required=True, help="weights + history.json ($OUT on the GPU machine)")
    p.add_argument("--arch", action="append", choices=("lite0", "lite1", "lite2", "resnet50"),
                   help="a network to train (repeat: they train side by side on the same batches)")
    p.add_argument("--lr", type=float, action="append",
                   help="peak SGD LR at --batch, per --arch in order (one value: all); default 0.05")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--minutes", type=float, default=7.5, help="wall-clock training budget; the LR schedule spans it")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and schedule) by steps instead (dry runs)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="not on biases and BatchNorm")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the run")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the label CE; 1 - alpha on the teacher KL")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, default=0.35, help="random resized crop: smallest area fraction")
    p.add_argument("--frame-p", type=float, default=0.3, help="probability of placing the photo in a larger frame")
    p.add_argument("--frame-min", type=float, default=0.5, help="smallest width fraction a framed photo covers")
    p.add_argument("--jitter", type=float, default=0.2, help="brightness/contrast/saturation +- this")
    p.add_argument("--erasing", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--workers", type=int, default=14, help="processes that decode the pack at start-up")
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", type=int, default=None, help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--channels-last", type=int, default=None, help="channels_last memory format (default: CUDA)")
    p.add_argument("--val-every", type=int, default=5, help="epochs between val passes (and the last)")
    p.add_argument("--save-every-s", type=float, default=90.0, help="seconds between weights + history to --out")
    p.add_argument("--chunk-mib", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.arch = args.arch or ["lite0"]
    lrs = args.lr or [0.05]
    if len(lrs) not in (1, len(args.arch)):
        p.error("--lr: give one value, or one per --arch")
    args.lr = lrs * len(args.arch) if len(lrs) == 1 else lrs
    if len(set(args.arch)) != len(args.arch):
        p.error("--arch: each network once (its name names its weight files)")
    on_cuda = args.device.startswith("cuda")
    args.amp = bool(on_cuda if args.amp is None else args.amp)
    args.channels_last = bool(on_cuda if args.channels_last is None else args.channels_last)
    return args


def train(args: argparse.Namespace) -> dict:
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((pack / "meta.json").read_text())
    num_classes = len(meta["classes"])
    train_split = load_split(pack / "train.npz", args.size, args.workers)
    val_split = load_split(pack / "val.npz", args.size, args.workers)
    images = train_split["images"].to(device)
    labels = train_split["labels"].to(device)
    teacher = train_split["teacher"].to(device) if train_split["teacher"] is not None else None
    t_decoded = time.time() - t_start
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    nets = []
    for arch, lr in zip(args.arch, args.lr):
        model, what = build_network(arch, num_classes, pack)
        model = model.to(device).to(memory_format=fmt).train()
        opt_args = argparse.Namespace(**{**vars(args), "lr": lr})
        nets.append({"arch": arch, "lr": lr, "model": model, "what": what,
                     "optimizer": make_optimizer(model, opt_args), "history": []})
    n = len(labels)
    batch = min(args.batch, n)
    steps_per_epoch = n // batch
    budget_s = args.minutes * 60
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.minutes:.1f} min"
    print(f"{[net['what'] for net in nets]} on {device} ({machine(device)}): {num_classes} classes, {n} train / "
          f"{len(val_split['labels'])} val photos decoded in {t_decoded:.1f}s, {steps_per_epoch} steps/epoch of "
          f"{batch} at {args.size} px, budget {budget}, amp {args.amp}", flush=True)
    state = {"step": 0, "epoch": 0, "elapsed_s": 0.0}
    command = shlex.join([Path(sys.executable).name, "-m", "training.gpu_train", *sys.argv[1:]])

    def progress() -> float:
        return state["step"] / args.max_steps if args.max_steps else state["elapsed_s"] / budget_s

    def save(final: bool) -> None:
        weights = {net["arch"]: write_weights(out, float16_state(net["model"]), args.chunk_mib, prefix=net["arch"])
                   for net in nets}
        history = {
            "args": vars(args), "command": command, "num_classes": num_classes, "classes": meta["classes"],
            "split_hash": meta["split_hash"], "teacher": meta["teacher"], "pack": meta["encoding"],
            "counts": meta["counts"],
            "preprocessing": {
                "train": f"photos squashed to {args.size} px once; per step on the device: random resized crop "
                         f"(area {args.min_scale}-1, aspect 3/4-4/3 relative to the photo's) + flip, with p="
                         f"{args.frame_p} placed in a larger frame ({args.frame_min}-1 of the width) on a colour / "
                         f"smooth-noise / blurred-photo background, colour jitter {args.jitter}, random erasing "
                         f"p={args.erasing}",
                "eval": "whole photo resized to size x size (bilinear, antialias), aspect ratio not kept",
                "normalise": "x / 127.5 - 1, RGB (training.data.preprocess)", "size": args.size},
            "networks": {net["arch"]: {"model": net["what"], "lr": net["lr"], "history": net["history"],
                                       "weights": weights[net["arch"]]} for net in nets},
            "step": state["step"], "epoch": state["epoch"], "train_seconds": round(state["elapsed_s"], 1),
            "final": final, "machine": machine(device), "decode_seconds": round(t_decoded, 1),
        }
        _atomic_write(out / "history.json", (json.dumps(history, indent=2) + "\n").encode())
        print(f"  saved {sorted(weights)} + history.json to {out}", flush=True)

    stop = Stop()
    last_save = time.time()
    done = False
    while not done:
        t_epoch, losses = time.time(), {net["arch"]: [] for net in nets}
        order = torch.randperm(n, device=device)
        for s in range(steps_per_epoch):
            t_step = time.time()
            idx = order[s * batch: (s + 1) * batch]
            with torch.no_grad():
                x = crop_and_frame(images[idx].float(), args.min_scale, args.frame_p, args.frame_min)
                x = normalise(random_erasing(color_jitter(x, args.jitter), args.erasing), args.channels_last)
            y = labels[idx]
            t = teacher[idx] if teacher is not None else torch.zeros(0, device=device)
            for net in nets:
                for g in net["optimizer"].param_groups:
                    g["lr"] = net["lr"] * lr_factor(progress(), args.warmup)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    logits = net["model"](x)
                loss = distillation_loss(logits.float(), y, t, args.alpha, args.temperature, args.label_smoothing)
                net["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                net["optimizer"].step()
                losses[net["arch"]].append(loss.detach())
            state["step"] += 1
            if device.type == "cuda" and state["step"] % 10 == 0:
                torch.cuda.synchronize()  # so the wall clock counts the work, not the queueing
            state["elapsed_s"] += time.time() - t_step
            if progress() >= 1 or stop.requested:
                done = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t_epoch
        state["epoch"] += 1
        for net in nets:
            row = {"epoch": state["epoch"], "step": state["step"],
                   "train_loss": float(torch.stack(losses[net["arch"]]).mean()) if losses[net["arch"]] else None,
                   "lr": net["optimizer"].param_groups[0]["lr"],
                   "images_per_s": round(len(losses[net["arch"]]) * batch / max(seconds, 1e-9), 1)}
            if done or state["epoch"] % args.val_every == 0:
                t_val = time.time()
                row.update(evaluate(net["model"], val_split, args, device))
                state["elapsed_s"] += time.time() - t_val
            net["history"].append(row)
            print(f"{net['arch']} epoch {row['epoch']} step {row['step']} loss {row['train_loss'] or 0:.3f} "
                  f"val {row.get('val_top1_plain', float('nan')):.3f} framed {row.get('val_top1_framed', float('nan')):.3f}"
                  f" lr {row['lr']:.3g} {row['images_per_s']:.0f} img/s, {state['elapsed_s']:.0f}s, "
                  f"{progress():.0%} of {budget}", flush=True)
        if not done and time.time() - last_save > args.save_every_s:
            save(final=False)
            last_save = time.time()
    save(final=progress() >= 1)
    print(f"done: {state['epoch']} epochs, {state['step']} steps, {time.time() - t_start:.0f}s in all", flush=True)
    return state


if __name__ == "__main__":
    train(parse_args())
