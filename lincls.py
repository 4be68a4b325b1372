"""
The paper's Table 1 and Table 2 on a pre-trained backbone, with the protocols the paper
follows, under torchrun like train.py (or on one process):

  --mode linear    MoCo v3's linear classification (its main_lincls.py, which the paper's
                   Table 1 numbers follow): the backbone frozen and in eval mode, a linear
                   classifier trained on RandomResizedCrop + flip views for 90 epochs, SGD
                   with momentum 0.9, no weight decay, lr 0.1 x batch / 256 at batch 1024,
                   cosine per epoch; validated on Resize(256) + CenterCrop(224), top-1 / top-5.
  --mode finetune  SimCLR's semi-supervised protocol (Table 2): the whole network and a
                   linear classifier fine-tuned on 1% or 10% of the labels (SimCLR's split
                   files), Nesterov momentum 0.9, lr 0.05 x batch / 256, no weight decay, 60
                   epochs for 1% and 30 for 10%, random crop and flip only; top-5 reported.

Table 1 on ImageNet, 8 GPUs (compare top-1 with the paper's 71.9 / 73.2 and MoCo v3's 68.9):
    $ torchrun --standalone --nproc_per_node=8 lincls.py --checkpoint runs/in100/checkpoint.pth \\
        --data-dir /datasets/imagenet
Table 2 (1% and 10%; SimCLR's files: 1percent.txt, 10percent.txt):
    $ torchrun --standalone --nproc_per_node=8 lincls.py --checkpoint runs/in100/checkpoint.pth \\
        --data-dir /datasets/imagenet --mode finetune --labels 1 --split-file 1percent.txt
The CPU demo's checkpoint (Fashion-MNIST, 16 px views):
    $ python lincls.py --checkpoint runs/cpu/checkpoint.pth

Every image's augmentation is drawn from a generator seeded by (seed, epoch, image), so the
views do not depend on the number of processes or loader workers: 1 and 8 GPUs train on the
same views in the same global batches (when the data divide evenly over the processes:
DistributedSampler pads the rest), and a resumed run repeats the uninterrupted one.
Output in OUT_DIR (default: <checkpoint folder>/lincls or /finetune<labels>): checkpoint.pth
(atomic, for --resume auto), log.jsonl (one line per epoch), results.json.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

import data
import run_safety
import utils
from model import load_pretrained
from utils import UserError, autocast


# ----------------------------------------------------------------------------- config
def get_args(argv=None):
    p = utils.ArgumentParser(prog="lincls.py", description="Linear classification (Table 1) or semi-supervised "
                             "fine-tuning (Table 2) of a pre-trained backbone",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py checkpoint (its online backbone, MoCo v3's base encoder)")
    src.add_argument("--backbone", help="an exported backbone state_dict (evaluate.py --export-backbone); give --arch, "
                     "--data, --img-size")
    p.add_argument("--arch", help="--backbone only: torchvision ResNet name (default resnet18)")
    p.add_argument("--encoder", default="online", choices=["online", "momentum"], help="--checkpoint only: which backbone")
    p.add_argument("--data", choices=data.NAMES, help="default: the checkpoint's, else fashion-mnist")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="fashion-mnist: download with torchvision if missing")
    p.add_argument("--img-size", type=int, help="crop size (default: the checkpoint's training size; 224 on ImageNet)")
    p.add_argument("--mode", default="linear", choices=["linear", "finetune"],
                   help="linear: frozen backbone (Table 1); finetune: the whole network on --labels %% (Table 2)")
    p.add_argument("--labels", type=float, help="finetune: percent of the train labels, e.g. 1 or 10")
    p.add_argument("--split-file", help="finetune: SimCLR's split file (one image file name a line); "
                   "default: a seeded, class-balanced --labels %%")
    p.add_argument("--epochs", type=int, help="default: 90 (linear); 60 for <= 1%% labels, else 30 (finetune)")
    p.add_argument("--batch-size", type=int, help="total over all processes; default 1024 (linear), 4096 (finetune)")
    p.add_argument("--lr", type=float, help="base lr, x batch / 256; default 0.1 (linear), 0.05 (finetune)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--crop-min", type=float, default=0.08, help="smallest RandomResizedCrop scale (torchvision's default)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision on CUDA "
                   "(none: fp32, as main_lincls)")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    run_safety.add_run_flags(p, "<checkpoint or backbone folder>/lincls, or /finetune<labels>")
    args = p.parse_args(argv)
    linear = args.mode == "linear"
    if not linear and args.labels is None:
        p.error("--mode finetune needs --labels (the percent of train labels, e.g. 1 or 10)")
    if linear and (args.labels is not None or args.split_file):
        p.error("--labels and --split-file belong to --mode finetune")
    if args.epochs is None:   # the protocols' own settings; a value given, even 0, is checked below
        args.epochs = 90 if linear else 60 if args.labels <= 1 else 30
    if args.batch_size is None:
        args.batch_size = 1024 if linear else 4096
    if args.lr is None:
        args.lr = 0.1 if linear else 0.05
    utils.check_flags(p, args, positive=("epochs", "batch_size", "lr", "img_size", "dist_timeout"),
                      non_negative=("weight_decay", "workers", "stop_after_epoch",
                                                                                 "checkpoint_minutes"), fractions=("crop_min",))
    if not math.isfinite(args.lr):
        p.error(f"--lr {args.lr}: must be a finite number")
    if args.labels is not None and not 0 < args.labels <= 100:
        p.error(f"--labels {args.labels}: a percent in (0, 100]")
    return args


# ----------------------------------------------------------------------------- data
class SeededViews(torch.utils.data.Dataset):
    """A data set whose random augmentation of image i in epoch e is drawn from a generator
    seeded by (seed, e, i), never from the process's RNG: the views are the same whatever
    the number of processes, loader workers or restarts. The global RNG of the caller is
    left as it was (data.seeded), so a loader without workers does not disturb it."""

    def __init__(self, ds, transform, seed):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, seed, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label, _ = self.ds[i]
        return data.seeded(self.seed, self.epoch, i, lambda: (self.transform(img), label, i))


def train_transform(args):
    """main_lincls and SimCLR's fine-tuning: RandomResizedCrop + flip, nothing else."""
    return T.Compose([T.RandomResizedCrop(args.img_size, scale=(args.crop_min, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def balanced_subset(labels, percent, seed=0):
    """Indices of a class-balanced `percent`% of the labelled images: round(percent% of each
    class), at least one per class, drawn from a seeded permutation of each class. The
    permutation does not depend on the percentage, so with one seed the 1% subset lies
    inside the 10% one (as with nested label splits)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(members[:max(1, int(round(len(members) * percent / 100)))])
    return np.sort(np.concatenate(chosen))


def split_file_subset(ds, path):
    """SimCLR's ImageNet label splits (1percent.txt, 10percent.txt): one file name a line,
    e.g. n01440764_10026.JPEG. Matched to the data set's files by base name."""
    paths = data.sample_paths(ds)
    if paths is None:
        raise UserError(f"--split-file needs an image folder data set (--data folder/imagenet), not {type(ds).__name__}")
    if not os.path.isfile(path):
        raise UserError(f"--split-file {path}: no such file")
    pos = {os.path.basename(p): i for i, p in enumerate(paths)}
    with open(path) as f:
        names = [os.path.basename(line.strip()) for line in f if line.strip()]
    missing = [n for n in names if n not in pos]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} files of {path} are not in the train split "
                        f"(first: {missing[0]}): is --data-dir the data set the split was made for?")
    return np.array(sorted(pos[n] for n in names), dtype=np.int64)


def loaders(args):
    """The training loader (DistributedSampler over SeededViews; finetune: the labelled
    subset only) and the validation loader (every image once over all ranks, no padding:
    data.feature_loader); sets args.num_classes."""
    train_set = data.load_dataset(args.data, args.data_dir, "train", None, args.download)
    val_set = data.load_dataset(args.data, args.data_dir, "val", data.eval_transform(args.data, args.img_size),
                                args.download)
    data.check_same_classes(train_set, val_set)
    args.num_classes = len(train_set.classes)
    if args.mode == "finetune":
        idx = (split_file_subset(train_set, args.split_file) if args.split_file
               else balanced_subset(train_set.targets, args.labels, args.seed))
        args.num_labels = int(len(idx))
        train_set = data.IndexedSubset(train_set, torch.as_tensor(idx))
    views = SeededViews(train_set, train_transform(args), args.seed)
    if args.batch_size % args.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the number of processes "
                        f"({args.world_size}): it is the global batch")
    per_rank = args.batch_size // args.world_size
    # the workers ignore SIGTERM and SIGUSR1: the process acts on them (run_safety.Checkpoints)
    # and ends its workers itself (data.close_iterator)
    sampler = data.ResumableSampler(views, args.world_size, args.rank, args.seed)
    train_loader = torch.utils.data.DataLoader(views, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                                               pin_memory=args.device.type == "cuda",
                                               worker_init_fn=data.ignore_stop_signals)
    val_loader = data.feature_loader(val_set, 256, args, term=True)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- model
def build_model(backbone, feat_dim, args):
    """The pre-trained backbone with a new linear classifier where its own was (a ResNet's
    fc: torchvision's layout, so the result loads into torchvision.models.<arch>()).
    linear: every backbone parameter frozen, the classifier initialised N(0, 0.01) with zero
    bias (main_lincls). Returns the model and the digest of the frozen backbone for MoCo
    v3's sanity check."""
    torch.manual_seed(args.seed)
    head = nn.Linear(feat_dim, args.num_classes)
    head.weight.data.normal_(mean=0.0, std=0.01)
    head.bias.data.zero_()
    backbone.set_submodule(backbone.classifier_path, head)
    mine = {backbone.classifier_path + ".weight", backbone.classifier_path + ".bias"}
    for name, p in backbone.named_parameters():   # finetune: every weight (a momentum backbone came frozen)
        p.requires_grad = args.mode == "finetune" or name in mine
    digest = None   # finetune trains every weight: nothing to check
    if args.mode == "linear":
        digest = {k: v for k, v in utils.state_digest(backbone).items() if k not in mine}
    return backbone, digest


# ----------------------------------------------------------------------------- epochs
def train_one_epoch(model, loader, optimizer, scaler, epoch, args, checkpoints, start=None):
    """One epoch. linear: the model stays in eval mode, as in main_lincls: BatchNorm in train
    mode would revise the frozen backbone's running statistics. finetune: train mode, lr
    cosine per step (SimCLR). After every step but the last the ranks agree whether to
    checkpoint mid-epoch (run_safety.Checkpoints); start: (step, LossSums) of a run resumed
    mid-epoch. Returns the mean loss and the training top-1."""
    model.eval() if args.mode == "linear" else model.train()
    first, meter = start or (0, run_safety.LossSums(args.device, skips_allowed=scaler.is_enabled(), terms=3))
    steps = first + len(loader)   # the loader holds the steps not yet taken
    batches = iter(loader)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.master, leave=False,
               initial=first, total=steps)
    try:
        for i, (x, y, _) in enumerate(bar, first):
            if args.mode == "finetune":
                set_lr(optimizer, args, (epoch + i / steps) / args.epochs)
            x, y = data.to_input(x, args.data, args.device), y.to(args.device, non_blocking=True)
            with autocast(args.device, args.amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # loss x n, correct, n (no host-to-GPU copy: no sync)
            meter.add(loss.detach() * len(y), (logits.argmax(1) == y).sum().float(),
                      torch.full((), float(len(y)), device=args.device))
            if i % 20 == 0 or i == steps - 1:
                run_safety.check_divergence(meter, bar, epoch, i, args, "Lower --lr")
            checkpoints.after_step(i, steps, epoch, bar, args,
                                   lambda: run_safety.MidEpoch(i + 1, meter.state_dict()))   # noqa: B023
    finally:
        data.close_iterator(batches)
    if args.distributed:
        dist.all_reduce(meter.sums)
    loss, correct, n, _ = meter.sums.tolist()
    return loss / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def validate(model, loader, args):
    """Top-1 and top-5 on the validation split, each image counted once over all ranks
    (the counts are all-reduced, so the result is exact on any number of processes)."""
    model.eval()
    sums = torch.zeros(3, device=args.device)   # top-1 correct, top-5 correct, n
    batches = iter(loader)
    try:
        for x, y, _ in tqdm(batches, total=len(loader), desc="  validate", disable=not args.master, leave=False):
            x, y = data.to_input(x, args.data, args.device), y.to(args.device, non_blocking=True)
            with autocast(args.device, args.amp):
                top = model(x).float().topk(min(5, args.num_classes), dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack([hit[:, 0].sum().float(), hit.any(1).sum().float(),
                                 torch.full((), float(len(y)), device=args.device)])
    finally:
        data.close_iterator(batches)
    if args.distributed:
        dist.all_reduce(sums)
    c1, c5, n = sums.tolist()
    return c1 / max(n, 1), c5 / max(n, 1)


def set_lr(optimizer, args, progress):
    """Half-cosine from lr x batch / 256 to 0; progress in [0, 1): per epoch for linear
    (main_lincls's adjust_learning_rate), per step for finetune."""
    for g in optimizer.param_groups:
        g["lr"] = utils.cosine_schedule(progress, 1, args.lr * args.batch_size / 256)


# ----------------------------------------------------------------------------- main
def run(args):
    utils.setup_distributed(args, args.dist_timeout)
    backbone, feat_dim, _, _, _ = load_pretrained(args, torch.device("cpu"))   # sets --data, --img-size, --arch
    name = "lincls" if args.mode == "linear" else f"finetune{args.labels:g}"
    src = args.checkpoint or args.backbone
    args.source = os.path.abspath(src)   # what this run evaluates: a resume must evaluate the same
    stem = os.path.splitext(os.path.basename(src))[0]
    name = name if stem == "checkpoint" else f"{name}_{stem}"   # checkpoint_epoch50.pth: lincls_checkpoint_epoch50/
    args.out_dir = args.out_dir or os.path.join(os.path.dirname(args.source), name)
    train_loader, val_loader = loaders(args)
    model, digest = build_model(backbone, feat_dim, args)
    model, raw = utils.distribute(model, args, sync_bn=args.mode == "finetune")   # linear: BN frozen in eval mode
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr * args.batch_size / 256, momentum=args.momentum,
                                nesterov=args.mode == "finetune", weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.device.type == "cuda" and args.amp == "fp16")

    state = {"best": 0.0}   # the best top-1 so far, saved with every checkpoint
    start, state["best"], within = resume(*run_safety.open_run(args, "lincls.py", {"model", "optimizer", "epoch",
                                                                                  "best_top1"}),
                                          raw, optimizer, scaler, args)

    def save(epoch, steps, mid=None):   # every rank calls it (Checkpoints); rank 0 writes
        if args.master:
            run_safety.atomic_save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scaler": scaler.state_dict(), "epoch": epoch + (mid is None),
                                    "within": vars(mid) if mid else None, "best_top1": state["best"],
                                    "args": run_safety.saved_args(args)}, os.path.join(args.out_dir, "checkpoint.pth"))
    checkpoints = run_safety.Checkpoints(args, save)
    if args.master:
        print(f"{args.mode} | {args.arch} on {args.data} | {len(train_loader.dataset)} train images -> "
              f"{len(val_loader.dataset)} val | {args.world_size} x {args.device.type} | batch {args.batch_size} | "
              f"{args.epochs} epochs")

    top1 = top5 = None
    epoch = start - 1
    try:
        for epoch in range(start, args.epochs):
            t0, begin = time.time(), None
            train_loader.dataset.epoch = epoch
            if within:   # resumed mid-epoch: the next batch of this epoch, its loss sums so far
                train_loader.sampler.set_epoch(epoch, within.step * (args.batch_size // args.world_size))
                meter = run_safety.LossSums(args.device, skips_allowed=scaler.is_enabled(), terms=3)
                meter.load_state_dict(within.meter, args.rank, args.world_size)
                begin, within = (within.step, meter), None
            else:
                train_loader.sampler.set_epoch(epoch)
            if args.mode == "linear":
                set_lr(optimizer, args, epoch / args.epochs)
            loss, train_top1 = train_one_epoch(model, train_loader, optimizer, scaler, epoch, args, checkpoints, begin)
            if args.mode == "linear" or epoch == args.epochs - 1:
                top1, top5 = validate(raw, val_loader, args)   # not through DDP: ranks may hold unequal batches
                state["best"] = max(state["best"], top1)
            if args.mode == "linear":
                sanity_check(raw, digest)
            run_safety.log_line(args, {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": loss,
                                       "train_top1": train_top1, "top1": top1, "top5": top5, "best_top1": state["best"],
                                       "time": round(time.time() - t0, 2)})
            if args.master:
                print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | train top-1 {train_top1:.4f}"
                      + (f" | val top-1 {top1:.4f} top-5 {top5:.4f}" if top1 is not None else ""))
            checkpoints.after_epoch(epoch, len(train_loader), args)
            if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch:
                break
    finally:
        checkpoints.close()
    best = state["best"]
    res = None
    if args.master and top1 is not None and epoch + 1 == args.epochs:
        res = {"mode": args.mode, "top1": top1, "top5": top5, "best_top1": best, "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr, "labels_percent": args.labels,
               "labelled_images": getattr(args, "num_labels", None), "split_file": args.split_file,
               "source": args.checkpoint or args.backbone, "encoder": args.encoder, "processes": args.world_size,
               "backbone_unchanged": args.mode == "linear" or None}
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"{args.mode}: top-1 {top1:.4f} (best {best:.4f}), top-5 {top5:.4f} -> {args.out_dir}/results.json")
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return res


# On resume: flags that make another protocol are refused; the optimisation's may change
# (the command line wins, as in MoCo v3), and the run says which did.
PROTOCOL_FLAGS = {k: "another protocol" for k in ("mode", "labels", "split_file", "encoder", "img_size", "data")}
TRAINING_FLAGS = ("lr", "epochs", "batch_size", "weight_decay", "momentum", "crop_min", "amp")


def resume(ckpt, path, model, optimizer, scaler, args):
    """--resume auto / PATH (read by run_safety.open_run, which also locks OUT_DIR and makes
    the ranks agree): the classifier (or fine-tuned network), optimiser and scaler of the
    checkpoint; returns (the epoch to start from, the best top-1 so far, the MidEpoch of a
    run stopped mid-epoch or None). The views are seeded per image and epoch, so no RNG
    state is needed to repeat the uninterrupted run. The log is cut back to the
    checkpoint's epoch (emptied for a fresh run)."""
    if ckpt is None:
        if args.master:
            run_safety.trim_log(os.path.join(args.out_dir, "log.jsonl"), 0)
        return 0, 0.0, None
    saved = ckpt.get("args", {})
    if saved.get("source", args.source) != args.source:
        raise UserError(f"cannot resume {path}: it evaluates {saved['source']}, this command {args.source}; "
                        "give another --out-dir")
    run_safety.check_resumed_flags(ckpt, args, path, PROTOCOL_FLAGS, noted=TRAINING_FLAGS)
    within = run_safety.restore(ckpt, path, model, optimizer, scaler, args)
    return ckpt["epoch"], ckpt["best_top1"], within


def sanity_check(model, digest):
    """MoCo v3's sanity check: the linear protocol must not change any weight or buffer of
    the backbone (a BatchNorm in train mode would move its running statistics)."""
    changed = utils.changed_keys(model, digest)
    if changed:
        raise RuntimeError(f"the frozen backbone changed during linear training ({len(changed)} tensors, e.g. {changed[0]})")


def main(argv=None):
    return utils.guard("lincls.py", run, get_args(argv))


if __name__ == "__main__":
    main()
