"""Train the global ResNet50 in plain PyTorch on the packed photos (make train-gpu, on the GPU machine).

    python3 -m training.resnet_torch --pack gpu --out $OUT --minutes 8        # one H100, DEVELOPERS.md
    python -m training.resnet_torch --pack /tmp/p --out /tmp/w --device cpu --size 64 --max-steps 2   # dry run

Runs where there is no TensorFlow and no Keras: it imports only the standard
library, numpy, PIL and torch (+ torchvision when it imports; else the
identical ResNet50 below). Never import another training module from here.

Model: torchvision's resnet50(weights=None, num_classes=C, zero_init_residual=True),
v1.5 layout (the stride on the 3x3 conv). Where torchvision is missing or broken
(the CPU wheel here) `ResNet50` below builds the same network with the same
state_dict keys; the GPU run checks the two agree before training.

Input, as the export's in-graph preprocessing (training.data.preprocess) sees it:
RGB, resized to size x size with bilinear + antialias (PIL's BILINEAR filter
widens with the scale, as tf.image.resize(antialias=True)), aspect ratio not
kept, then x / 127.5 - 1. Training augments on the way: a random crop of 25-100 %
of the photo's area (aspect 3/4-4/3 RELATIVE to the photo's, so the plain view
is the whole photo squashed as served), a horizontal flip (CPU workers, from the
packed JPEG bytes), then mild colour jitter and random erasing (on the device,
batched). Val: the whole photo resized, no augmentation.

Loss: alpha * CE(label smoothing) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
the teacher's log-probabilities (training.gpu_pack, from the served
efficientnet_lite0) re-tempered at T. SGD + Nesterov (or AdamW), linear warm-up
then cosine to 0 over the WALL-CLOCK budget (--minutes): the schedule ends when
the time does, whatever the throughput turns out to be (--max-steps: over steps).
bf16 autocast and channels_last on CUDA.

Out (--out, $OUT on the GPU machine; rewritten at every checkpoint, so a run
killed at the 10-minute limit still brings back its latest weights):
    weights.partNN.npz  the float16 state_dict (no num_batches_tracked) in chunks of <= --chunk-mib
    history.json        args, classes, per-epoch rows (loss, val top-1, images/s, loader wait),
                        machine, the parts' sha256 (training.resnet_keras checks them)
--ckpt (device-local, default runs/resnet_gpu/last.pt): fp32 model + optimizer +
progress, for --resume on the same (still warm) machine.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

LAYERS = (3, 4, 6, 3)  # ResNet50


# --- the network (torchvision.models.resnet50's layout and state_dict keys) -------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int, zero_init_residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (blocks, planes) in enumerate(zip(LAYERS, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def torchvision_resnet50(num_classes: int):
    """torchvision's model, or None where torchvision does not import (missing, or built for another torch)."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError on import
        return None, None
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)
    return model, f"torchvision {torchvision.__version__} resnet50"


def build_model(num_classes: int, impl: str = "auto") -> tuple[nn.Module, str]:
    """(model, what it is). impl: auto (torchvision if it imports), torchvision, local."""
    if impl in ("auto", "torchvision"):
        model, name = torchvision_resnet50(num_classes)
        if model is not None:
            ours = {k: tuple(v.shape) for k, v in ResNet50(num_classes).state_dict().items()}
            theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            if ours != theirs:  # the export (training.resnet_keras) reads these keys: fail now, not after training
                raise SystemExit(f"torchvision's resnet50 state_dict differs from ResNet50's: "
                                 f"{sorted(set(ours.items()) ^ set(theirs.items()))[:4]}")
            return model, name
        if impl == "torchvision":
            raise SystemExit("torchvision does not import")
    return ResNet50(num_classes), "training.resnet_torch.ResNet50 (torchvision's layout and keys)"


# --- the packed photos ----------------------------------------------------------------------

class Pack:
    """One split of a training.gpu_pack folder, held in memory (workers share it after fork)."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as z:
            self.jpeg = z["jpeg"]
            self.offsets = z["offsets"]
            self.labels = z["labels"].astype(np.int64)
            self.teacher = z["teacher_logp"] if "teacher_logp" in z.files else None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        blob = self.jpeg[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return Image.open(io.BytesIO(blob)).convert("RGB")


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        rng: random.Random) -> Image.Image:
    """A crop of `scale` of the area, aspect `ratio` relative to the photo's, resized to size x size
    (bilinear, antialiased on the way down) in one PIL call."""
    w, h = img.size
    area = rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    fw, fh = min(1.0, math.sqrt(area * r)), min(1.0, math.sqrt(area / r))
    cw, ch = fw * w, fh * h
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


class Photos(torch.utils.data.Dataset):
    """(uint8 [size, size, 3] RGB, label, teacher log-probabilities or an empty row)."""

    def __init__(self, pack: Pack, size: int, train: bool, scale: tuple[float, float] = (0.25, 1.0)):
        self.pack, self.size, self.train, self.scale = pack, size, train, scale
        self.rng = random.Random()

    def __len__(self) -> int:
        return len(self.pack)

    def __getitem__(self, i: int):
        img = self.pack.image(i)
        if self.train:
            img = random_resized_crop(img, self.size, self.scale, (3 / 4, 4 / 3), self.rng)
            if self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((self.size, self.size), Image.BILINEAR)
        teacher = self.pack.teacher[i].astype(np.float32) if self.pack.teacher is not None else np.zeros(0, np.float32)
        return torch.from_numpy(np.asarray(img, np.uint8).copy()), int(self.pack.labels[i]), torch.from_numpy(teacher)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng.seed(torch.initial_seed() % 2**32)
    try:
        import cv2  # PIL does the work; keep an installed OpenCV from spawning threads per worker

        cv2.setNumThreads(1)
    except ImportError:
        pass


# --- on-device steps --------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] per image; x in 0..255."""
    if strength <= 0:
        return x
    n = x.shape[0]

    def factor():
        return 1 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * strength

    x = x * factor()
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    gray = _gray(x)
    x = (x - gray) * factor() + gray
    return x.clamp(0, 255)


def random_erasing(x: torch.Tensor, p: float, area=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """With probability p per image, one rectangle of `area` of it replaced by uniform noise (0..255)."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    dev = x.device
    a = (torch.rand(n, device=dev) * (area[1] - area[0]) + area[0]) * h * w
    r = torch.exp(torch.rand(n, device=dev) * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0]))
    eh, ew = torch.sqrt(a * r).clamp(max=h), torch.sqrt(a / r).clamp(max=w)
    y0, x0 = torch.rand(n, device=dev) * (h - eh), torch.rand(n, device=dev) * (w - ew)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    mask = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1)) & (xs >= x0.view(n, 1, 1))
            & (xs < (x0 + ew).view(n, 1, 1)) & (torch.rand(n, 1, 1, device=dev) < p))
    return torch.where(mask.unsqueeze(1), torch.rand_like(x) * 255, x)


def to_input(images: torch.Tensor, device: torch.device, train: bool, args) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (x / 127.5 - 1, as training.data.preprocess)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if train:
        x = random_erasing(color_jitter(x, args.jitter), args.erasing)
    x = x / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def distillation_loss(logits, labels, teacher_logp, alpha: float, temperature: float, smoothing: float):
    ce = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    if teacher_logp.numel() == 0 or alpha >= 1:
        return ce
    target = F.log_softmax(teacher_logp / temperature, dim=1)  # the teacher's p^(1/T), renormalised
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature**2 * kl


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the run, then cosine to 0; progress in [0, 1]."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))))


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # biases and BatchNorm
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


@torch.no_grad()
def evaluate(model, loader, device, args) -> dict:
    model.eval()
    correct = n = 0
    loss = 0.0
    for images, labels, _ in loader:
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(to_input(images, device, False, args)).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        n += len(labels)
    model.train()
    return {"val_top1": correct / max(n, 1), "val_loss": loss / max(n, 1), "val_n": n}


# --- weights out ------------------------------------------------------------------------------

def float16_state(model: nn.Module) -> dict[str, np.ndarray]:
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        a = v.detach().float().cpu().numpy().astype(np.float16)
        if not np.isfinite(a).all():
            raise ValueError(f"{k} overflows float16")
        state[k.removeprefix("_orig_mod.")] = a
    return state


def write_weights(out: Path, state: dict[str, np.ndarray], chunk_mib: float, prefix: str = "weights") -> list[dict]:
    """The state_dict as <prefix>.part00.npz, ... of at most chunk_mib each; returns [{file, sha256, keys}]."""
    limit = chunk_mib * 2**20 - 64 * 1024  # room for the npz headers
    chunks, current, size = [], {}, 0
    for k, a in state.items():
        if current and size + a.nbytes > limit:
            chunks.append(current)
            current, size = {}, 0
        current[k] = a
        size += a.nbytes
    chunks.append(current)
    parts = []
    for i, chunk in enumerate(chunks):
        name = f"{prefix}.part{i:02d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **chunk)
        _atomic_write(out / name, buf.getvalue())
        parts.append({"file": name, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "keys": len(chunk)})
    for stale in out.glob(f"{prefix}.part*.npz"):
        if stale.name not in {p["file"] for p in parts}:
            stale.unlink()
    return parts


def read_weights(folder: Path, prefix: str = "weights", listed: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Reassemble <prefix>.part*.npz, checked against `listed` ([{file, sha256}], default: history.json's
    "weights" for this module's runs) where there is such a list."""
    folder = Path(folder)
    if listed is None and prefix == "weights" and (folder / "history.json").exists():
        listed = json.loads((folder / "history.json").read_text()).get("weights")
    files = [p["file"] for p in listed] if listed else sorted(f.name for f in folder.glob(f"{prefix}.part*.npz"))
    if not files:
        raise SystemExit(f"no {prefix}.part*.npz in {folder}")
    state = {}
    for i, name in enumerate(files):
        blob = (folder / name).read_bytes()
        if listed and hashlib.sha256(blob).hexdigest() != listed[i]["sha256"]:
            raise SystemExit(f"{folder / name} does not match history.json's sha256 (a partial copy?)")
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            state.update({k: z[k] for k in z.files})
    return state


def _atomic_write(path: Path, blob: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def machine(device: torch.device) -> str:
    where = f"{platform.node()} {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return where


# --- the run ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", default="gpu", help="training.gpu_pack folder")
    p.add_argument("--out", required=True, help="weights + history.json ($OUT on the GPU machine)")
    p.add_argument("--ckpt", default="runs/resnet_gpu/last.pt", help="device-local full checkpoint for --resume")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt (same budget and schedule)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget; the LR schedule spans it")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and schedule) by steps instead (dry runs)")
    p.add_argument("--call-minutes", type=float, default=None,
                   help="stop THIS call after so many minutes of training (checkpoint; finish with --resume)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.1, help="peak LR (SGD: 0.1 at batch 256; AdamW: ~2e-3)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="not on biases and BatchNorm (AdamW: ~0.05)")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    p.add_argument("--alpha", type=float, default=0.3, help="weight of the label CE; 1 - alpha on the teacher KL")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, default=0.25, help="random resized crop: smallest area fraction")
    p.add_argument("--jitter", type=float, default=0.2, help="brightness/contrast/saturation +- this")
    p.add_argument("--erasing", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", type=int, default=None, help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--channels-last", type=int, default=None, help="channels_last memory format (default: CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (costs compile time)")
    p.add_argument("--impl", choices=("auto", "torchvision", "local"), default="auto")
    p.add_argument("--val-every", type=int, default=1, help="epochs between val passes (and the last)")
    p.add_argument("--save-every-s", type=float, default=90.0, help="seconds between checkpoints + weights to --out")
    p.add_argument("--chunk-mib", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.amp is None:
        args.amp = int(args.device.startswith("cuda"))
    args.amp = bool(args.amp)
    if args.channels_last is None:
        args.channels_last = int(args.device.startswith("cuda"))
    args.channels_last = bool(args.channels_last)
    return args


class Stop:
    """SIGTERM/SIGINT (the device's time limit, a ^C) end the run cleanly after the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        print(f"signal {signum}: stopping after this step", flush=True)
        self.requested = True


def train(args: argparse.Namespace) -> dict:
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pack_dir, out, ckpt_path = Path(args.pack), Path(args.out), Path(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((pack_dir / "meta.json").read_text())
    train_pack, val_pack = Pack(pack_dir / "train.npz"), Pack(pack_dir / "val.npz")
    num_classes = len(meta["classes"])
    model, impl = build_model(num_classes, args.impl)
    model = model.to(device).to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, args)

    state = {"step": 0, "epoch": 0, "elapsed_s": 0.0, "history": [], "commands": []}
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint {ckpt_path} (a fresh machine? see DEVELOPERS.md)")
        saved = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        budget_minutes = saved["args"]["minutes"] if args.max_steps is None else args.minutes
        print(f"resumed {ckpt_path}: step {state['step']}, epoch {state['epoch']}, "
              f"{state['elapsed_s']:.0f}s of the budget spent", flush=True)
        args.minutes = budget_minutes
    command = shlex.join([Path(sys.executable).name, "-m", "training.resnet_torch", *sys.argv[1:]])
    state["commands"].append(command)
    step_model = torch.compile(model) if args.compile else model

    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
                     persistent_workers=args.workers > 0)
    if args.workers > 0:
        loader_kw["prefetch_factor"] = 4
    batch = min(args.batch, len(train_pack))
    train_loader = torch.utils.data.DataLoader(Photos(train_pack, args.size, True, (args.min_scale, 1.0)),
                                               batch_size=batch, shuffle=True, drop_last=True, **loader_kw)
    val_loader = torch.utils.data.DataLoader(Photos(val_pack, args.size, False), batch_size=2 * batch, **loader_kw)
    steps_per_epoch = len(train_loader)
    budget_s = args.minutes * 60
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.minutes:.1f} min"
    print(f"{impl} on {device} ({machine(device)}): {num_classes} classes, {len(train_pack)} train / "
          f"{len(val_pack)} val photos, {steps_per_epoch} steps/epoch of {batch} at {args.size} px, "
          f"budget {budget}, amp {args.amp}, channels_last {args.channels_last}, "
          f"start-up {time.time() - t_start:.1f}s", flush=True)

    def progress() -> float:
        if args.max_steps:
            return state["step"] / args.max_steps
        return state["elapsed_s"] / budget_s

    def save(final: bool) -> None:
        t0 = time.time()
        parts = write_weights(out, float16_state(model), args.chunk_mib)
        history = {
            "args": vars(args), "model": impl, "num_classes": num_classes, "classes": meta["classes"],
            "split_hash": meta["split_hash"], "teacher": meta["teacher"], "pack": meta["encoding"],
            "counts": meta["counts"], "preprocessing": {
                "train": f"random resized crop (area {args.min_scale}-1, aspect 3/4-4/3 relative to the photo's) + "
                         f"flip (PIL bilinear, antialias), colour jitter {args.jitter}, random erasing p={args.erasing}",
                "eval": "whole photo resized to size x size (bilinear, antialias), aspect ratio not kept",
                "normalise": "x / 127.5 - 1, RGB (training.data.preprocess)", "size": args.size},
            "step": state["step"], "epoch": state["epoch"], "train_seconds": round(state["elapsed_s"], 1),
            "final": final, "commands": state["commands"], "command": state["commands"][0],
            "machine": machine(device), "history": state["history"], "weights": parts,
        }
        _atomic_write(out / "history.json", (json.dumps(history, indent=2) + "\n").encode())
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                    "args": vars(args)}, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)
        print(f"  saved {len(parts)} weight parts + history.json to {out}, checkpoint {ckpt_path} "
              f"({time.time() - t0:.1f}s)", flush=True)

    stop = Stop()
    model.train()
    t_loop = time.time()
    last_save = time.time()
    done = progress() >= 1
    while not done:
        t_epoch, wait, seen, losses = time.time(), 0.0, 0, []
        t_fetch = time.time()
        for images, labels, teacher in train_loader:
            wait += time.time() - t_fetch
            for g in optimizer.param_groups:
                g["lr"] = args.lr * lr_factor(progress(), args.warmup)
            x = to_input(images, device, True, args)
            labels, teacher = labels.to(device, non_blocking=True), teacher.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = step_model(x)
            loss = distillation_loss(logits.float(), labels, teacher, args.alpha, args.temperature,
                                     args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            seen += len(labels)
            state["step"] += 1
            state["elapsed_s"] += time.time() - t_fetch
            t_fetch = time.time()
            if progress() >= 1 or stop.requested or (
                    args.call_minutes and time.time() - t_loop > args.call_minutes * 60):
                done = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t_epoch
        state["epoch"] += 1
        row = {"epoch": state["epoch"], "step": state["step"],
               "train_loss": float(torch.stack(losses).mean()) if losses else None,
               "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(seen / max(seconds, 1e-9), 1),
               "loader_wait_fraction": round(wait / max(seconds, 1e-9), 3), "seconds": round(seconds, 2)}
        if done or state["epoch"] % args.val_every == 0:
            t_val = time.time()
            row.update(evaluate(model, val_loader, device, args))
            row["val_seconds"] = round(time.time() - t_val, 2)
            state["elapsed_s"] += time.time() - t_val
        state["history"].append(row)
        print(f"epoch {row['epoch']} step {row['step']} loss {row['train_loss'] or 0:.3f} "
              f"val top1 {row.get('val_top1', float('nan')):.3f} lr {row['lr']:.3g} {row['images_per_s']:.0f} img/s "
              f"(loader wait {row['loader_wait_fraction']:.0%}) {state['elapsed_s']:.0f}s, {progress():.0%} of {budget}",
              flush=True)
        if not done and time.time() - last_save > args.save_every_s:
            save(final=False)
            last_save = time.time()
    save(final=progress() >= 1)
    print(f"done: {state['epoch']} epochs, {state['step']} steps, val top-1 "
          f"{state['history'][-1].get('val_top1', float('nan')):.3f}, {time.time() - t_start:.0f}s in all", flush=True)
    return state


if __name__ == "__main__":
    train(parse_args())
