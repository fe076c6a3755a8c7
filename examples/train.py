#!/usr/bin/env python
"""Image-classification training of any timm model (default RepLKNet-31B) converted by lkpatch.

One GPU, random images, timing the unconverted model first (--compare):

    python examples/train.py --synthetic --amp bf16 --channels-last --compare

Eight GPUs (DDP over NCCL) on an ImageFolder (DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg),
then continuing the run after a stop:

    torchrun --nproc_per_node=8 examples/train.py --data /data/imagenet --batch-size 64 \\
        --amp bf16 --channels-last --sync-bn --model-ema --output runs/r31b
    torchrun --nproc_per_node=8 examples/train.py --data /data/imagenet --batch-size 64 \\
        --amp bf16 --channels-last --sync-bn --model-ema --output runs/r31b --resume runs/r31b/last.pth

Two CPU processes (gloo), a small model:

    torchrun --nproc_per_node=2 examples/train.py --device cpu --synthetic --model convnext_atto \\
        --img-size 64 --batch-size 4 --steps 4 --output /tmp/run

The model is converted (``lkpatch.convert_model``) before DDP wrapping and ``torch.compile``, which
capture its modules. The schedule is a function of --epochs; --steps stops the run early on it.
Data order and augmentation are functions of (--seed, step, rank), and each rank's random state
is saved in the checkpoint, so a resumed run takes the same steps as one never stopped. A resume
keeps the schedule, optimizer settings and global batch it was written with (others are refused),
and an --output holding an earlier run's last.pth is written only by the run that resumes it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import os
import random
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import common
from common import ExampleError

import lkpatch


# ------------------------------------------------------------------------------------ arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Commands: see the top of examples/train.py.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="replknet_31b", help="a timm model name (default: replknet_31b)")
    g.add_argument("--model-arg", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="constructor argument for the model, e.g. drop_path_rate=0.3 (Python literals)")
    g.add_argument("--num-classes", type=int, help="default: the class folders of --data, or 1000")
    g.add_argument("--img-size", type=int, help="training resolution (default: the model's, e.g. 224)")
    g.add_argument("--no-lkpatch", action="store_true", help="train the unconverted model (a baseline)")
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="an ImageFolder with train/ and val/ subfolders")
    src.add_argument("--synthetic", action="store_true", help="random images and labels (timing, tests)")
    g.add_argument("--synthetic-images", type=int, default=1_281_167,
                   help="images in a synthetic epoch (default: ImageNet-1k's count, so the schedule is a real one)")
    g.add_argument("--val-batches", type=int, default=10, help="synthetic validation batches per process")
    g.add_argument("--workers", type=int, default=8, help="data loading processes per training process")
    g.add_argument("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--steps", type=int, help="stop after this many optimizer steps in all (the schedule stays "
                   "the one of --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="images per process (per GPU)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 4e-3 x global batch / 4096)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name (default: adamw)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9, help="for SGD-like optimizers")
    g.add_argument("--sched", default="cosine", help="timm scheduler name (default: cosine), stepped per update")
    g.add_argument("--warmup-epochs", type=float, default=5.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="autocast dtype (default: bf16 on a GPU, off on the CPU); fp16 adds a GradScaler")
    g.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    g.add_argument("--compile", action="store_true", help="torch.compile the (converted, wrapped) model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward")
    g.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (GPU)")
    g.add_argument("--compare", action="store_true",
                   help="first time a few steps of the unconverted and the converted model, print both")
    g.add_argument("--compare-steps", type=int, default=10, help="timed steps per model for --compare")
    g.add_argument("--compare-warmup", type=int, default=3, help="untimed steps per model for --compare")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="DIR", help="folder for last.pth")
    g.add_argument("--save-every", type=int, default=1000, help="write last.pth every N steps (and at the end)")
    g.add_argument("--resume", metavar="CKPT", help="continue from a last.pth of this script (--output "
                   "defaults to its folder)")
    g.add_argument("--log-interval", type=int, default=50, help="print loss, lr and img/s every N steps")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and at the end)")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "save_every", "log_interval", "val_every", "compare_steps", "val_batches",
                 "synthetic_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("workers", "compare_warmup", "weight_decay", "warmup_epochs", "reprob", "mixup", "cutmix",
                 "smoothing", "warmup_lr", "min_lr"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if args.img_size is not None and args.img_size < 32:
        p.error("--img-size must be at least 32 (the models downsample by 32)")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be positive")
    if not 0 <= args.model_ema_decay < 1:
        p.error("--model-ema-decay must lie in [0, 1)")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.num_classes is not None and args.num_classes < 1:
        p.error("--num-classes must be at least 1")
    if "num_classes" in common.parse_model_args(args.model_arg):
        p.error("set the class count with --num-classes, not --model-arg num_classes=...")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        p.error("mixup/cutmix mix pairs of images: --batch-size must be even")
    return args


# ------------------------------------------------------------------------------ distributed set-up

class Dist:
    """This process's place in the run: rank, world size, device."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = common.resolve_device(device_arg)
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise ExampleError(f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                   f"use --nproc_per_node <= {torch.cuda.device_count()}")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, position, ...), reproducibly."""
    h = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every GPU's generator


def rng_state(device: torch.device) -> Dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (keys.tolist(), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------ data

class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` applies its random transforms from ``seed``:
    augmentation is then a function of the sample's place in the run, not of which loader
    worker happened to load it. The caller's random state is left as it was."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                return self.base[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochBatches(torch.utils.data.Sampler):
    """One process's batches of one epoch, from ``start`` on: a permutation drawn from (seed,
    epoch), cut into global batches of ``batch * world`` images, of which rank r takes the r-th
    slice; each image comes with the seed of its augmentation (seed, epoch, position). The last
    incomplete global batch is dropped, so every process takes the same number of steps."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start
        self.per_epoch = n // (batch * world)

    def __len__(self):
        return max(0, self.per_epoch - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.per_epoch):
            first = (b * self.world + self.rank) * self.batch
            yield [(perm[i], mix_seed(self.seed, "aug", self.epoch, i)) for i in range(first, first + self.batch)]


class ImageFolderData:
    """``DIR/train`` and ``DIR/val`` through timm's transforms (augmentation from the options)."""

    @staticmethod
    def class_folders(root: str) -> List[str]:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise ExampleError(f"--data {root}: no '{split}' folder in it (expected an ImageFolder: "
                                   f"{split}/<class>/<image>)")
        classes = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
        if not classes:
            raise ExampleError(f"--data {root}: train/ has no class folders")
        return classes

    def __init__(self, args, data_cfg: Dict, d: Dist):
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        common_cfg = dict(input_size=data_cfg["input_size"], interpolation=data_cfg["interpolation"],
                          mean=data_cfg["mean"], std=data_cfg["std"])
        train_tf = create_transform(**common_cfg, is_training=True, auto_augment=args.aa, re_prob=args.reprob)
        val_tf = create_transform(**common_cfg, is_training=False, crop_pct=data_cfg["crop_pct"])
        try:
            self.train = ImageFolder(os.path.join(args.data, "train"), transform=train_tf)
            self.val = ImageFolder(os.path.join(args.data, "val"), transform=val_tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise ExampleError(f"--data {args.data}: {e}") from e
        if self.val.classes != self.train.classes:
            raise ExampleError(f"--data {args.data}: val/ has other class folders than train/ "
                               f"({len(self.val.classes)} vs {len(self.train.classes)})")
        self.num_classes = len(self.train.classes)
        self.args, self.d = args, d
        self.steps_per_epoch = len(self.train) // (args.batch_size * d.world)
        if self.steps_per_epoch == 0:
            raise ExampleError(f"--data {args.data}: {len(self.train)} training images, fewer than one global batch "
                               f"({args.batch_size} x {d.world} processes)")
        self.workers = max(0, min(args.workers, (os.cpu_count() or 1) // max(1, int(os.environ.get(
            "LOCAL_WORLD_SIZE", "1")))))

    def _loader(self, dataset, **kw):
        # Its own generator: creating an iterator must not draw from the training random state.
        return torch.utils.data.DataLoader(dataset, num_workers=self.workers, pin_memory=self.d.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(self.args.seed),
                                           persistent_workers=False, **kw)

    def epoch(self, epoch: int, start: int):
        """(images, labels) batches of ``epoch`` from batch ``start`` on."""
        a, d = self.args, self.d
        sampler = EpochBatches(len(self.train), a.batch_size, d.world, d.rank, a.seed, epoch, start)
        for x, y in self._loader(SeededDataset(self.train), batch_sampler=sampler):
            yield x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)

    def val_batches(self):
        d = self.d
        shard = torch.utils.data.Subset(self.val, range(d.rank, len(self.val), d.world))
        for x, y in self._loader(shard, batch_size=self.args.batch_size, shuffle=False):
            yield x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)


class SyntheticData:
    """Random images and labels, made on the device from (seed, step, rank)."""

    def __init__(self, args, num_classes: int, img_size: int, d: Dist):
        self.args, self.num_classes, self.size, self.d = args, num_classes, img_size, d
        self.steps_per_epoch = max(1, args.synthetic_images // (args.batch_size * d.world))
        self.gen = torch.Generator(device=d.device)

    def batch(self, *key) -> Tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        self.gen.manual_seed(mix_seed(a.seed, *key, self.d.rank))
        x = torch.randn(a.batch_size, 3, self.size, self.size, device=self.d.device, generator=self.gen)
        y = torch.randint(0, self.num_classes, (a.batch_size,), device=self.d.device, generator=self.gen)
        return x, y

    def epoch(self, epoch: int, start: int):
        for b in range(start, self.steps_per_epoch):
            yield self.batch("train", epoch * self.steps_per_epoch + b)

    def val_batches(self):
        for i in range(self.args.val_batches):
            yield self.batch("val", i)


# ------------------------------------------------------------------------------------- training

class Trainer:
    """The model wrapped for training (DDP, compile), its optimizer, scaler and EMA, and one step."""

    def __init__(self, model: nn.Module, args, d: Dist, lr: float, mixup=None):
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3

        self.model, self.args, self.d, self.mixup = model, args, d, mixup
        self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum)
        self.amp = args.amp
        # bf16 keeps fp32's exponent range: no loss scaling. fp16 needs it.
        self.scaler = torch.amp.GradScaler(d.device.type) if args.amp == "fp16" else None
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
        wrapped = model
        if d.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
        if args.compile:
            wrapped = torch.compile(wrapped)
        self.wrapped = wrapped
        if args.mixup > 0 or args.cutmix > 0:
            from timm.loss import SoftTargetCrossEntropy
            self.criterion = SoftTargetCrossEntropy()  # mixup's targets are soft, smoothing included
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (no host wait)."""
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        x = x.contiguous(memory_format=self.memory_format)
        with common.autocast(self.d.device, self.amp):
            loss = self.criterion(self.wrapped(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.args.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step + 1)
        return loss.detach()


def compare_speed(model: nn.Module, args, d: Dist, lr: float, mixup, data: SyntheticData, img_size: int) -> None:
    """Time training steps of the unconverted model and the converted one, with the same
    settings, on copies (the run itself starts from the untouched model). Warm-up steps are not
    timed; the two models' timed rounds alternate, so drift affects both alike."""
    x, y = data.batch("compare", 0)
    trainers = {"PyTorch": Trainer(lkpatch.revert_model(copy.deepcopy(model)), args, d, lr, mixup),
                "lkpatch": Trainer(copy.deepcopy(model), args, d, lr, mixup)}
    rounds = 2 if args.compare_steps >= 2 else 1
    per_round = [args.compare_steps // rounds + (1 if r < args.compare_steps % rounds else 0) for r in range(rounds)]
    seconds = {k: 0.0 for k in trainers}
    for key, t in trainers.items():
        for i in range(args.compare_warmup):
            t.step(x, y, i)
    for n in per_round:
        for key, t in trainers.items():
            sync(d)
            t0 = time.perf_counter()
            for i in range(n):
                t.step(x, y, i)
            sync(d)
            seconds[key] += time.perf_counter() - t0
    images = args.compare_steps * args.batch_size * d.world
    ips = {k: images / s for k, s in seconds.items()}
    what = (f"batch {args.batch_size} x {d.world} process{'es' if d.world > 1 else ''}, {img_size} px, amp {args.amp}"
            f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
            f"{', grad checkpointing' if args.grad_checkpointing else ''}")
    d.print(f"compare ({args.compare_steps} steps each after {args.compare_warmup} untimed; {what}): "
            f"PyTorch {ips['PyTorch']:.1f} img/s, lkpatch {ips['lkpatch']:.1f} img/s, "
            f"speed-up {ips['lkpatch'] / ips['PyTorch']:.2f}x"
            + common.cpu_ratio_note(d.device))
    del trainers
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()


def sync(d: Dist) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


@torch.no_grad()
def validate(models: Dict[str, nn.Module], data, d: Dist, args) -> Dict[str, float]:
    """Top-1 of each model over every process's shard. Runs the plain (unwrapped) modules:
    the shards may differ in length, and DDP's forward would wait for the other processes."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    counts = {k: torch.zeros(2, device=d.device, dtype=torch.float64) for k in models}
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    for x, y in data.val_batches():
        x = x.contiguous(memory_format=fmt)
        with common.autocast(d.device, args.amp):
            for k, m in models.items():
                counts[k] += torch.stack([(m(x).argmax(-1) == y).sum().double(),
                                          torch.tensor(y.numel(), device=d.device, dtype=torch.float64)])
    for k, m in models.items():
        m.train(was_training[k])
    out = {}
    for k, c in counts.items():
        correct, total = d.all_sum(c).tolist()
        out[k] = (100.0 * correct / total if total else float("nan"), int(total))
    return out


def params_digest(model: nn.Module) -> str:
    """sha256 of every parameter's bytes (logical NCHW order, whatever the memory format)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, trainer: Trainer, scheduler, step: int, epoch: int, args, d: Dist, meta: Dict) -> None:
    """Every process's random state is gathered; process 0 writes the file (atomically)."""
    rng = d.gather(rng_state(d.device))
    if not d.main:
        return
    state = {
        "model": trainer.model.state_dict(),
        "model_ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "step": step, "epoch": epoch, "world_size": d.world, "rng": rng,
        "args": {k: v for k, v in vars(args).items()}, **meta,
    }
    common.save_atomic(state, path)


# Arguments the optimizer's and the schedule's saved state depend on.
SCHEDULE_ARGS = ("epochs", "lr", "opt", "weight_decay", "momentum", "sched", "warmup_epochs", "warmup_lr", "min_lr")


def load_resume(path: str, trainer: Trainer, scheduler, args, d: Dist, meta: Dict) -> int:
    """Restore a checkpoint of this script; returns the step it was written at."""
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or "step" not in ckpt or "optimizer" not in ckpt:
        raise ExampleError(f"--resume {path}: not a checkpoint of examples/train.py (no step/optimizer in it)")
    for key in ("model_name", "model_args", "num_classes"):
        if ckpt.get(key) != meta[key]:
            raise ExampleError(f"--resume {path}: it was written with {key}={ckpt.get(key)!r}, this run has "
                               f"{meta[key]!r}; resume with the same --model / --model-arg / data")
    saved = ckpt.get("args", {})
    # The optimizer's and the schedule's state resume as saved: settings that shape them must be
    # the ones the checkpoint was written with, or the run would silently not follow them.
    for key in SCHEDULE_ARGS:
        if key in saved and saved[key] != getattr(args, key):
            raise ExampleError(f"--resume {path}: it was written with --{key.replace('_', '-')} {saved[key]}, this run "
                               f"has {getattr(args, key)}; the optimizer and the schedule resume as saved, so resume "
                               f"with the same value (or start a new run)")
    if "batch_size" in saved and saved["batch_size"] * ckpt.get("world_size", d.world) != args.batch_size * d.world:
        raise ExampleError(f"--resume {path}: it was written with a global batch of {saved['batch_size']} x "
                           f"{ckpt.get('world_size')} processes, this run has {args.batch_size} x {d.world}; the "
                           f"schedule counts steps of that batch, so keep the global batch the same")
    if trainer.ema is None and ckpt.get("model_ema") is not None:  # its next write would drop the EMA
        raise ExampleError(f"--resume {path}: it holds an EMA of the weights (written with --model-ema), and this "
                           f"run keeps none, so its next checkpoint would lose it; add --model-ema")
    common.load_strict(trainer.model, ckpt["model"], f"--model {args.model}")
    if trainer.ema is not None:
        if ckpt.get("model_ema") is None:
            d.print("resume: the checkpoint has no EMA; the EMA starts from the current weights")
            trainer.ema.module.load_state_dict(ckpt["model"])
        else:
            trainer.ema.module.load_state_dict(ckpt["model_ema"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler is not None and ckpt.get("scaler") is not None:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("world_size") == d.world and saved.get("batch_size") == args.batch_size:
        set_rng_state(ckpt["rng"][d.rank], d.device)
    else:
        # Other processes or batch: the run goes on, but not along the same random path.
        d.print(f"resume: written by {ckpt.get('world_size')} processes with batch {saved.get('batch_size')}, "
                f"now {d.world} with {args.batch_size}: data order and random state start afresh")
        seed_everything(mix_seed(args.seed, "resume", ckpt["step"], d.rank))
    return int(ckpt["step"])


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    d = Dist(args.device)
    try:
        return run(args, d)
    finally:
        d.close()


def check_output(args) -> None:
    """--output's problems before any work (training up to the first save is otherwise lost): the
    folder is made, last.pth can be written there, and an earlier run's last.pth is not replaced
    unless this run resumes it."""
    from lkpatch import checkpoint

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ExampleError(f"--output {args.output} is a file; give a folder")
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        raise ExampleError(f"--output {args.output}: {checkpoint.describe_os_error(e)}") from None
    last = os.path.join(args.output, "last.pth")
    if os.path.isdir(last):
        raise ExampleError(f"--output {args.output}: last.pth in it is a folder, where the checkpoint goes; move it "
                           f"away or give another --output")
    if os.path.isfile(last) and not (args.resume and os.path.samefile(last, args.resume)):
        raise ExampleError(f"--output {args.output} holds an earlier run's last.pth; continue it with --resume "
                           f"{last}, or give another --output")
    try:
        checkpoint.check_output_path(last, overwrite=True)
    except checkpoint.CheckpointError as e:
        raise ExampleError(f"--output {args.output}: {e}") from None


def run(args, d: Dist) -> int:
    from timm.data import Mixup, resolve_data_config
    from timm.layers import convert_sync_batchnorm
    from timm.scheduler import create_scheduler_v2

    if args.amp is None:
        args.amp = "bf16" if d.device.type == "cuda" else "off"
    if args.sync_bn and d.device.type != "cuda" and d.world > 1:
        raise ExampleError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
    if args.resume and not os.path.isfile(args.resume):
        raise ExampleError(f"--resume {args.resume}: no such file")
    if args.resume and not args.output:
        args.output = os.path.dirname(os.path.abspath(args.resume))  # go on writing where it was written
    if args.output:
        check_output(args)
    if args.compare and args.no_lkpatch:
        raise ExampleError("--compare times the unconverted model against the converted one; drop --no-lkpatch")
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest cuDNN algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True
        # Every process builds or loads the extension now, before anything is timed; the first
        # one compiles, the others wait on the build's file lock and load its result.
        common.build_extension(d.device, quiet=not d.main)

    model_args = common.parse_model_args(args.model_arg)
    if args.data:
        classes = ImageFolderData.class_folders(args.data)
        num_classes = args.num_classes or len(classes)
        if num_classes < len(classes):
            raise ExampleError(f"--num-classes {num_classes}: --data has {len(classes)} classes")
    else:
        num_classes = args.num_classes or 1000
    # The same initial weights on every process (DDP also broadcasts process 0's).
    seed_everything(args.seed)
    model = common.create_model(args.model, num_classes=num_classes, **model_args)
    if args.data:
        data_cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size else {},
                                       model=model)
        data = ImageFolderData(args, data_cfg, d)
        img_size = data_cfg["input_size"][-1]
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        img_size = args.img_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
        data = SyntheticData(args, num_classes, img_size, d)
    meta = {"model_name": args.model, "model_args": model_args, "num_classes": num_classes, "img_size": img_size}

    # Convert first: DDP and torch.compile capture the modules they wrap.
    if not args.no_lkpatch:
        lkpatch.convert_model(model)
        report = lkpatch.conversion_report(model)
        d.print(f"lkpatch: {len(report.converted)} of {len(report.layers)} depthwise convolutions converted")
    if args.sync_bn and d.world > 1:
        model = convert_sync_batchnorm(model)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ExampleError(f"--grad-checkpointing: {args.model} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model.to(d.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()

    global_batch = args.batch_size * d.world
    lr = args.lr if args.lr is not None else 4e-3 * global_batch / 4096
    steps_per_epoch = data.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    max_steps = min(total_steps, args.steps) if args.steps else total_steps
    n_params = sum(p.numel() for p in model.parameters())
    d.print(f"{args.model}: {n_params / 1e6:.1f} M parameters, {num_classes} classes, {img_size} px; "
            f"{d.world} process{'es' if d.world > 1 else ''} on {d.device.type}, batch {args.batch_size} each "
            f"({global_batch} in all), lr {lr:.3g}, amp {args.amp}; {steps_per_epoch} steps an epoch, "
            f"{args.epochs} epochs" + (f", stopping at step {max_steps}" if max_steps < total_steps else ""))

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    if args.compare:
        compare_speed(model, args, d, lr, mixup, data if isinstance(data, SyntheticData) else
                      SyntheticData(args, num_classes, img_size, d), img_size)
    trainer = Trainer(model, args, d, lr, mixup)
    scheduler, _ = create_scheduler_v2(trainer.optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    step = 0
    if args.resume:
        step = load_resume(args.resume, trainer, scheduler, args, d, meta)
        if args.steps is not None and args.steps <= step:
            raise ExampleError(f"--steps {args.steps}: {args.resume} is at step {step} already; --steps counts "
                               f"from the run's start, so give a larger one")
        d.print(f"resumed from {args.resume} at step {step} (epoch {step // steps_per_epoch})")
    else:
        # Each process its own random path (dropout, drop-path, mixup), set after every
        # set-up step that draws random numbers, so --compare does not change the run.
        seed_everything(mix_seed(args.seed, "train", d.rank))
    last_path = os.path.join(args.output, "last.pth") if args.output else None

    try:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=None if d.main else True)  # None: only on a terminal
        write = bar.write if not bar.disable else (lambda s: print(s, flush=True))
    except ImportError:
        bar, write = None, (lambda s: print(s, flush=True))
    say = write if d.main else (lambda s: None)

    def checkpoint(at_step: int) -> None:
        if last_path:
            save_checkpoint(last_path, trainer, scheduler, at_step, at_step // steps_per_epoch, args, d, meta)

    def run_validation() -> None:
        models = {"model": model}
        if trainer.ema is not None:
            models["EMA"] = trainer.ema.module
        res = validate(models, data, d, args)
        parts = [f"{k} {top1:.2f}%" for k, (top1, _) in res.items()]
        total = next(iter(res.values()))[1]
        say(f"val after step {step} ({step / steps_per_epoch:g} epochs): top-1 " + ", ".join(parts)
            + f" on {total} images")

    # Timing: the first steps (cuDNN autotuning, compilation, allocator growth) are left out of
    # the run's img/s, and so are validation and checkpoint writing.
    timing_skip = min(5, max(0, (max_steps - step) // 2))
    t_start = None
    paused = 0.0  # seconds of validation and checkpoint writing so far (only grows)
    loss_sum = torch.zeros((), device=d.device, dtype=torch.float64)
    n_logged, t_log, paused_at_log = 0, time.perf_counter(), 0.0
    first_step = step
    last_validated = -1
    paused_at_start = 0.0
    if timing_skip == 0:
        t_start = time.perf_counter()

    def pause(fn, *a):
        nonlocal paused
        sync(d)
        t0 = time.perf_counter()
        fn(*a)
        sync(d)
        paused += time.perf_counter() - t0

    epoch = step // steps_per_epoch
    while step < max_steps:
        at_epoch_start = step
        for x, y in data.epoch(epoch, step - epoch * steps_per_epoch):
            scheduler.step_update(num_updates=step)  # lr of this update, from the step count alone
            loss = trainer.step(x, y, step)
            step += 1
            loss_sum += loss
            n_logged += 1
            if bar is not None:
                bar.update(1)
            if step - first_step == timing_skip and t_start is None:
                sync(d)
                t_start, paused_at_start = time.perf_counter(), paused
            if step % args.log_interval == 0 or step == max_steps:
                mean = (d.all_sum(torch.stack([loss_sum, torch.tensor(float(n_logged), device=d.device,
                                                                      dtype=torch.float64)])))
                mean_loss = (mean[0] / mean[1]).item()  # the host waits here, at log steps only
                now = time.perf_counter()
                ips = n_logged * global_batch / max(1e-9, now - t_log - (paused - paused_at_log))
                lr_now = trainer.optimizer.param_groups[0]["lr"]
                say(f"step {step} epoch {epoch} loss {mean_loss:.8f} lr {lr_now:.4e} img/s {ips:.1f}")
                if bar is not None and not bar.disable:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}")
                loss_sum.zero_()
                n_logged, t_log, paused_at_log = 0, now, paused
            if last_path and step % args.save_every == 0 and step < max_steps:
                pause(checkpoint, step)
            if step >= max_steps:
                break
        if step == at_epoch_start:
            raise ExampleError(f"epoch {epoch} gave no batches")
        if step % steps_per_epoch == 0:  # the epoch ran to its end
            if (step // steps_per_epoch) % args.val_every == 0:
                pause(run_validation)
                last_validated = step
            epoch += 1
    sync(d)
    t_end = time.perf_counter()
    if bar is not None:
        bar.close()

    if last_validated != step and step > first_step:
        run_validation()
    if last_path and step > first_step:
        checkpoint(step)
        say(f"wrote {last_path} (step {step})")

    timed_steps = step - first_step - timing_skip
    if t_start is not None and timed_steps > 0:
        ips = timed_steps * global_batch / (t_end - t_start - (paused - paused_at_start))
        say(f"done: {step - first_step} steps of {global_batch} images; {ips:.1f} img/s "
            f"({ips / d.world:.1f} per process) over the last {timed_steps} steps "
            f"({args.model}, {'lkpatch' if not args.no_lkpatch else 'PyTorch'}, amp {args.amp}"
            f"{', channels_last' if args.channels_last else ''})")
    else:
        say(f"done: step {step}; no steps to time")

    # Every process must hold the same weights: DDP averages the gradients and each optimizer
    # applies them to the same parameters. Checked, not assumed.
    if d.world > 1:
        digests = d.gather(params_digest(model))
        if len(set(digests)) == 1:
            say(f"ranks: parameters identical on all {d.world} processes (sha256 {digests[0][:16]})")
        else:
            say(f"ranks: parameters DIFFER between processes: {[h[:12] for h in digests]}")
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExampleError as e:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"train.py: error{where}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except common.Interrupted as e:  # a signal while last.pth was written
        print(f"train.py: interrupted by {e}; {common.interrupted_checkpoint(e, 'last.pth')}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
