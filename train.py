"""
SiamMM pre-training: a Siamese ResNet with a momentum encoder, trained with the instance
loss (eq. 12) plus the likelihood of a von Mises-Fisher mixture (eq. 9, 10) that is refit
every epoch and merged down from K0 clusters (eq. 11). Paper: arXiv 2511.05462.

On a CPU, no arguments: Fashion-MNIST (apt-get install dataset-fashion-mnist), about 10 minutes on 2 cores
    $ python train.py
One GPU:
    $ python train.py --preset imagenet-100ep --data-dir /datasets/imagenet --batch-size 512
8 GPUs on one node (the paper's setting: batch 4096, ResNet-50):
    $ torchrun --standalone --nproc_per_node=8 train.py --preset imagenet-100ep --data-dir /datasets/imagenet
2 nodes of 8 GPUs (run on each node, --node_rank 0 and 1):
    $ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py --preset imagenet-200ep --data-dir /datasets/imagenet
Resume an interrupted run:  add --resume auto (continues from OUT_DIR/checkpoint.pth).

Each epoch (sec. 5.1 "training procedure"):
  1. feature pass: the momentum encoder embeds the training set (evaluation transform);
     every rank embeds its own shard, each sample exactly once (with --features targets,
     only in the first clustering epoch and the last: the others reuse the momentum
     targets k that the previous training epoch computed anyway, kept per sample in a bank);
  2. E/M step (cluster.py): k-means warm-started from last epoch's centroids (sec. 4.3),
     mu (eq. 6) and kappa (eq. 7 / 16); each sample's s nearest centroids and weights (eq. 10);
  3. a training epoch with L = L_inst + lambda_c L_clus (eq. 13);
  4. merging of close clusters (eq. 11), then a checkpoint and one JSON line in log.jsonl.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from cluster import VMFMixture, faiss_has_gpu
from loss import siammm_loss
from model import SiamMM, model_args, momentum_at

# ----------------------------------------------------------------------------- config
# Presets set defaults; any flag given on the command line wins over its preset.
PRESETS = {
    # The embedded default: Fashion-MNIST on a 2-core CPU in about 10 minutes (bench/RESULTS.md
    # has every run behind these choices). Small stem for 28 px images; a quarter-width
    # resnet18 (--width 16: about 7x the images/s of width 64, which matters more than capacity
    # at this budget, "A narrower ResNet"); small heads; a 5k-image subset; SGD (LARS needs
    # large batches). 48 epochs: k-means on the backbone reaches raw pixels on the test split
    # (ACC 0.469-0.539 over six runs against 0.491); 24 stayed below ("48 epochs").
    # merge_lambda (eq. 11): the paper grid-searches lambda per data set (sec. 5.1). Here 2.0
    # stalls K near 140 of 500, 1.75 levels off at 32-41, 1.5 merges past the 10 classes to
    # 3-8; 1.625 brings K from 500 to 10, 9 and 6 by seed (Fig. 2's behaviour), with k-means
    # and learned-cluster AMI level with or above 1.75 ("The merging threshold", "K to 10").
    # It is tuned for 48 epochs: with --epochs 96, K merges on to 5 ("Twice the epochs").
    "cpu": dict(data="fashion-mnist", arch="resnet18", small_stem=True, width=16, img_size=16, subset=5000,
                proj_hidden=512, pred_hidden=512, dim=128, pca_dim=64, batch_size=128, epochs=48,
                optimizer="sgd", lr=0.06, weight_decay=5e-4, warmup_epochs=0, momentum=0.99,
                num_clusters=500, crop_min=0.2, workers=2, merge_lambda=1.625),
    # sec. 5.1: ResNet-50, 3-layer 4096-d projector, 2-layer predictor, 256-d, K0 = 100,000,
    # LARS (wd 1e-6, momentum 0.9), batch 4096, cosine lr, MoCo v3 augmentations. The paper's
    # base lr values were lost in extraction; these are MoCo v3's ResNet-50 values. Its
    # lambda of eq. 11 was lost too ("a percentile of the normalised pairwise distance"):
    # 2.0 merges pairs below about the 2nd percentile, were d Gaussian. The paper uses MoCo v3's
    # augmentations; MoCo v3's ResNet-50 recipes (its CONFIG.md) crop with --crop-min .2.
    "imagenet-100ep": dict(data="imagenet", arch="resnet50", small_stem=False, width=64, img_size=224, subset=0,
                           proj_hidden=4096, pred_hidden=4096, dim=256, pca_dim=150, batch_size=4096,
                           epochs=100, optimizer="lars", lr=0.6, weight_decay=1e-6, warmup_epochs=10,
                           momentum=0.99, num_clusters=100000, crop_min=0.2, workers=10, merge_lambda=2.0),
    "imagenet-200ep": dict(data="imagenet", arch="resnet50", small_stem=False, width=64, img_size=224, subset=0,
                           proj_hidden=4096, pred_hidden=4096, dim=256, pca_dim=150, batch_size=4096,
                           epochs=200, optimizer="lars", lr=0.5, weight_decay=1e-6, warmup_epochs=10,
                           momentum=0.99, num_clusters=100000, crop_min=0.2, workers=10, merge_lambda=2.0),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SiamMM pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="defaults for a setting; flags override")
    # data
    p.add_argument("--data", choices=["fashion-mnist", "folder", "imagenet"], help="data set")
    p.add_argument("--data-dir", default="", help="fashion-mnist: idx files (default /usr/share/datasets/fashion-mnist); "
                   "folder/imagenet: a folder with train/ and val/")
    p.add_argument("--download", action="store_true", help="fashion-mnist: download with torchvision if missing (needs internet)")
    p.add_argument("--subset", type=int, help="train on a seeded random subset of this many images (0 = all)")
    p.add_argument("--img-size", type=int, help="crop size of the training views")
    p.add_argument("--crop-min", type=float, help="smallest RandomResizedCrop scale")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU/process")
    # model (sec. 5.1)
    p.add_argument("--arch", help="torchvision ResNet: resnet18, resnet50, ...")
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 stem, no max-pool (28-64 px images)")
    p.add_argument("--width", type=int, help="channels of the stem and first stage; stages are x1, x2, x4, x8 (torchvision: 64)")
    p.add_argument("--proj-hidden", type=int, help="projector hidden width (paper 4096)")
    p.add_argument("--pred-hidden", type=int, help="predictor hidden width (paper 4096)")
    p.add_argument("--dim", type=int, help="embedding dimension D (paper 256)")
    p.add_argument("--momentum", type=float, help="initial EMA momentum m0, cosine-scheduled to 1")
    # optimisation (sec. 5.1)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="total over all GPUs")
    p.add_argument("--optimizer", choices=["lars", "sgd"])
    p.add_argument("--lr", type=float, help="base lr; the actual lr is lr x batch-size / 256")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up, then cosine decay")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="mixed precision on CUDA (ignored on CPU)")
    # the mixture model (sec. 4)
    p.add_argument("--num-clusters", type=int, help="initial number of clusters K0 (paper 100,000)")
    p.add_argument("--kappa", default="pca", choices=["pca", "mle", "const"],
                   help="concentration: eq. 16 (PCA), eq. 7 (MLE) or constant (Table 7 ablation)")
    p.add_argument("--pca-dim", type=int, help="d', principal components for eq. 16 (paper 150 of 256)")
    p.add_argument("--kappa-clip", type=float, default=10.0, help="largest normalised kappa (mean is 1)")
    p.add_argument("--kmeans-iters", type=int, default=3, help="Lloyd iterations per epoch, warm-started (sec. 4.3)")
    p.add_argument("--init-iters", type=int, default=20, help="Lloyd iterations of the first (and re-initialised) k-means")
    p.add_argument("--feature-bn", default="batch", choices=["batch", "running"],
                   help="BN statistics of the feature pass: each batch's own, as when the momentum branch makes the "
                        "targets k, or the eval-mode running ones (they collapse the mixture; see SiamMM.embed)")
    p.add_argument("--features", default="pass", choices=["pass", "targets"],
                   help="E-step features: 'pass' = a momentum-encoder pass over the data before each epoch (SPEC 2.4, "
                        "PCL); 'targets' = each sample's momentum targets k from the last training epoch, kept in a "
                        "memory bank (ODC / SwAV-style online features: a pass only in the first and last epochs; feature_bank_update)")
    p.add_argument("--feature-batch-size", type=int, default=256,
                   help="images per batch of the feature pass, per process (the same cut on any number of GPUs)")
    p.add_argument("--reinit-centroids", action="store_true",
                   help="ablation (Table 7, Fig. 7): fresh k-means every epoch with --nredo restarts, PCL style")
    p.add_argument("--nredo", type=int, default=5, help="restarts with --reinit-centroids")
    p.add_argument("--soft-k", type=int, default=3, help="s, nearest centroids per sample (eq. 10); 1 = hard assignment (eq. 8, Table 6)")
    p.add_argument("--tau", type=float, default=0.1, help="temperature of the soft assignment (eq. 10)")
    p.add_argument("--assign-prior", action="store_true", help="add log pi_k to the eq. 10 logits")
    p.add_argument("--merge-lambda", type=float, help="lambda of eq. 11; merge if d < E[d] - lambda sigma[d] "
                   "(preset: 1.625 on the CPU, 2.0 on ImageNet)")
    p.add_argument("--no-merge", action="store_true", help="ablation (Table 5): keep K fixed")
    p.add_argument("--min-clusters", type=int, default=2, help="merging never takes K below this")
    p.add_argument("--cluster-warmup-epochs", type=int, default=0, help="epochs of instance loss only before the first clustering")
    # the loss (eq. 13) and its ablations (Tables 4, 8)
    p.add_argument("--cluster-weight", type=float, default=1.0, help="lambda_c of eq. 13")
    p.add_argument("--instance-loss", default="byol", choices=["byol", "infonce", "none"],
                   help="eq. 12; infonce = 'SiamMM w/ negative inst'; none = 'SiamMM w/o i' (Table 4)")
    p.add_argument("--cluster-loss", default="mle", choices=["mle", "neg-centroids", "neg-instances"],
                   help="eq. 9; eq. 14 negative centroids; eq. 15 negative instances (Table 8)")
    p.add_argument("--infonce-t", type=float, default=1.0, help="InfoNCE temperature (MoCo v3 ResNet: 1.0)")
    p.add_argument("--neg-t", type=float, default=0.2, help="temperature of eq. 14 / 15")
    p.add_argument("--num-neg", type=int, default=16000, help="negative centroids per batch for eq. 14 (PCL: 16000)")
    # run
    p.add_argument("--out-dir", default="runs/siammm")
    p.add_argument("--resume", default="", help="'auto' (OUT_DIR/checkpoint.pth if present) or a checkpoint path")
    p.add_argument("--stop-after-epoch", type=int, default=0, help="exit after this epoch (for job time limits); resume later")
    p.add_argument("--save-every", type=int, default=0, help="also keep checkpoint_epochN.pth every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- LARS
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by MoCo v3 / SimSiam for large batches: SGD with
    momentum whose step for each weight matrix is scaled by the trust ratio
    ||w|| / ||grad + wd w||. 1-D parameters (biases, BN) get neither weight decay nor the
    trust ratio (MoCo v3's rule)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(dp)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        g["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                    dp = dp.mul(trust)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(dp)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(params, args):
    lr = args.lr * args.batch_size / 256
    if args.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=args.weight_decay, momentum=0.9)
    # SGD for small batches (SimSiam's choice below batch 1024); no decay on 1-D params either
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def lr_at(t, args):
    """Linear warm-up for warmup_epochs, then half-cosine to 0 (per iteration; t = fractional epoch)."""
    base = args.lr * args.batch_size / 256
    if t < args.warmup_epochs:
        return base * t / args.warmup_epochs
    return base * 0.5 * (1 + math.cos(math.pi * (t - args.warmup_epochs) / (args.epochs - args.warmup_epochs)))


# ----------------------------------------------------------------------------- helpers
class LossMeter:
    """The epoch's mean loss terms, summed on the device (no synchronisation per step), and
    the divergence check. Under fp16 a non-finite loss is a step that GradScaler skips (it
    halves the scale and goes on; the weights are untouched): it is left out of the means,
    and only a long run of such steps in a row means divergence. Without a scaler a
    non-finite loss has already reached the weights: stop at once."""

    MAX_SKIPS_IN_A_ROW = 20   # the loss scale halved 20 times (1e-6): no longer an fp16 overflow

    def __init__(self, device, skips_allowed=False):
        self.sums = torch.zeros(4, device=device)   # loss, L_inst, L_clus, finite steps
        self.bad = torch.zeros((), device=device, dtype=torch.long)
        self.bad_run = torch.zeros((), device=device, dtype=torch.long)
        self.skips_allowed, self.steps, self.checked = skips_allowed, 0, 0

    def add(self, loss, l_inst, l_clus):
        ok = torch.isfinite(loss)
        terms = torch.stack([loss.detach(), l_inst, l_clus, torch.ones_like(l_inst)])
        self.sums += torch.where(ok, terms, torch.zeros_like(terms))
        self.bad += ~ok
        self.bad_run = (self.bad_run + 1) * ~ok
        self.steps += 1

    def check(self):
        """None, or what is wrong (synchronises with the device: call it every few steps)."""
        bad, run, window = int(self.bad), int(self.bad_run), self.steps - self.checked
        self.bad.zero_()
        self.checked = self.steps
        if bad and not self.skips_allowed:
            return f"the loss was not finite in {bad} of the last {window} steps"
        if run >= self.MAX_SKIPS_IN_A_ROW:
            return f"the loss was not finite in {run} steps in a row (fp16: GradScaler skipped each)"
        return None

    def means(self):
        s = self.sums.tolist()
        return [v / max(s[3], 1) for v in s[:3]]


def setup_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is world size 1."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    args.local_group = None   # a process group of this rank alone, for SyncBN in the feature pass
    if args.distributed:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device == "cuda":
            torch.cuda.set_device(args.local_rank)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":   # SyncBN (GPU only) must not sync the feature pass (model.batch_statistics)
            args.local_group, _ = dist.new_subgroups(group_size=1)
    args.master = args.rank == 0
    args.dev = torch.device("cuda", args.local_rank) if args.device == "cuda" else torch.device("cpu")


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never destroys the last
    good checkpoint (os.replace is atomic on POSIX)."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(dev):
    """This process's RNG states. On a GPU only its own device's: a job resumed on a node that
    shows fewer GPUs (CUDA_VISIBLE_DEVICES, another node type) must still restore it."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def set_rng_state(s, dev):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], dev)


# Flags that say where and how this process runs, not what it trains: a resume may change
# them without a note (the world size too: --batch-size is the total over all processes).
RUN_FLAGS = {"out_dir", "resume", "stop_after_epoch", "save_every", "workers", "device", "dev", "data_dir",
             "download", "distributed", "rank", "world_size", "local_rank", "master"}


def saved_args(args):
    """The flags as written to args.json and the checkpoint (no process-group handle)."""
    return {k: v for k, v in vars(args).items() if k != "local_group"} | {"dev": str(args.dev)}


def fail(msg):
    """One clear line for a person, no traceback, exit status 2. (An error raised in a
    DataLoader worker arrives wrapped in the worker's traceback: keep its last line.)"""
    msg = (str(msg).strip().splitlines() or ["unknown error"])[-1].removeprefix("data.DataError: ")
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def feature_loader(ds, args):
    """The feature pass's loader, built once per run: the data are cut into batches of
    --feature-batch-size independently of the world size and rank r embeds batches r, r + W,
    ...: every sample exactly once over all ranks and no sampler padding, so the cluster
    statistics (sums over samples, all-reduced) count each image once (SPEC 2.4), and each
    z_i is the same on any number of GPUs. The eval transform draws no random number, so the
    workers persist from epoch to epoch (restarting them cost about a sixth of the pass on
    the CPU default, bench/RESULTS.md "The epoch cost with the paper's feature pass")."""
    batches = data.feature_batches(len(ds), args.feature_batch_size, args.rank, args.world_size, args.seed)
    # generator: its own, so starting the workers draws no number from torch's global RNG,
    # which then stays the training augmentations' alone (a resumed run repeats exactly).
    # Not persistent: its workers exit after each pass instead of idling through the training
    # epoch, each holding its own copy of the file list (ImageNet: 1.28M paths) and memory.
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=args.workers,
                                       pin_memory=args.dev.type == "cuda", generator=torch.Generator())


@torch.no_grad()
def feature_pass(model, loader, args):
    """z_i = momentum embedding of every training image (eval transform), this rank's share
    (feature_loader). Returns (features n_r x D on CPU, dataset indices n_r)."""
    model.eval()  # with --feature-bn batch, embed() switches BN to batch statistics itself
    feats, index = [], []
    for x, _, idx in tqdm(loader, desc="  features", disable=not args.master, leave=False):
        x = data.to_input(x, args.data, args.dev)
        with autocast(args.dev, args.amp):
            z = model.embed(x, args.feature_bn, args.local_group)
        feats.append(z.float().cpu())
        index.append(idx)
    model.train()
    if not feats:   # more ranks than batches: this rank holds no sample
        return torch.zeros(0, args.dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(index)


def autocast(device, amp="bf16"):
    """Mixed precision on CUDA (bf16 by default, fp16 with a GradScaler); exact fp32 on a CPU.
    evaluate.py and bench/ use it too."""
    if device.type != "cuda" or amp == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def share_rows(n_total, index, values, args):
    """An n_total-row table whose rows `index` are this rank's `values`, with the rows of
    every other rank filled in by a sum all-reduce. Each row is owned by exactly one rank
    (the feature pass's cut, owned_rows), so the sum is a copy."""
    table = torch.zeros((n_total,) + tuple(values.shape[1:]), dtype=values.dtype)
    table[index.cpu()] = values.cpu()
    if args.distributed:
        red = args.dev if dist.get_backend() == "nccl" else torch.device("cpu")
        table = table.to(red)
        dist.all_reduce(table)
    return table.to(args.dev)


@torch.no_grad()
def assignment_table(mixture, feats, index, n_total, args):
    """Each sample's s nearest centroids and eq. 10 weights, as N x s tables indexed by
    dataset index. Every rank computes its own shard's rows and share_rows fills in the
    rest, so any rank can look up any sample of its shuffled training batch."""
    s = min(args.soft_k, mixture.centroids.shape[0])
    nbr_local, w_local = mixture.assign(feats, s=s, tau=args.tau, prior=args.assign_prior)
    return share_rows(n_total, index, nbr_local, args), share_rows(n_total, index, w_local, args)


def owned_rows(n_total, args, rank=None):
    """The dataset indices a rank embeds in the feature pass (data.feature_batches), in that
    order: the rows of the mixture's statistics this rank owns, whatever the E-step's source."""
    rank = args.rank if rank is None else rank
    return torch.tensor([i for b in data.feature_batches(n_total, args.feature_batch_size, rank, args.world_size, args.seed)
                         for i in b], dtype=torch.long)


@torch.no_grad()
def feature_bank_update(bank, owned, index, targets, args):
    """--features targets: write one training epoch's momentum targets into the bank.

    Each sample's row becomes normalize(k1 + k2), the mean direction of its two views'
    targets (the vMF maximum-likelihood mean of two draws, eq. 6), as the momentum encoder
    produced them during the epoch. Like SwAV and DINO, which cluster online, and ODC's
    memory bank, this replaces the separate feature pass (about 1/8 of a training epoch's
    compute) in every epoch but the first clustering one and the last.

    The bank is sharded like the feature pass (SPEC 2.4: no rank holds N x D): rank r keeps
    the rows of owned_rows(r). Each rank trained on a random 1/W of the data, so its
    targets are sent to their owners, one reduce per owner (each sample is in exactly one
    rank's epoch, so the sum is a copy). Samples no rank saw this epoch (drop_last leaves
    out N mod batch) keep their previous row.
    bank: (n_own x D) this rank's rows; owned: every rank's owned_rows, computed once per
    run; index: (n,) dataset indices of this rank's epoch; targets: (n x D) their unit-norm
    targets, on the CPU."""
    D = bank.shape[1]
    red = args.dev if args.distributed and dist.get_backend() == "nccl" else torch.device("cpu")
    owner = torch.empty(sum(len(o) for o in owned), dtype=torch.long)   # dataset index -> rank, position
    pos = torch.empty_like(owner)
    for r, own in enumerate(owned):
        owner[own], pos[own] = r, torch.arange(len(own))
    for r, own in enumerate(owned):
        mine = owner[index] == r                      # the samples I trained on that rank r owns
        block = torch.zeros(len(own), D + 1)          # targets, and a last column: seen this epoch
        block[pos[index[mine]], :D] = targets[mine]
        block[pos[index[mine]], D] = 1
        if args.distributed:
            block = block.to(red)
            dist.reduce(block, dst=r)
        if r == args.rank:
            block = block.cpu()
            seen = block[:, D] > 0
            bank[seen] = block[seen, :D]
    return bank


def bank_path(out_dir, rank, epoch=None):
    """Each rank saves its own shard of the bank (as SwAV saves its queue per rank)."""
    return os.path.join(out_dir, f"feature_bank_rank{rank}" + (f"_epoch{epoch}" if epoch else "") + ".pth")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Parse the flags and train; a problem with the user's input ends in one line (fail)."""
    args = get_args(argv)
    try:
        return train(args)
    except (data.DataError, ValueError) as e:
        fail(str(e))


def train(args):
    setup_distributed(args)
    torch.manual_seed(args.seed)  # the model is built from the same seed on every rank
    if args.dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data: labels are never used below
    train_set = data.subset(data.load_dataset(args.data, args.data_dir, "train",
                                              data.train_transform(args.data, args.img_size, args.crop_min),
                                              args.download), args.subset, args.seed)
    feat_set = data.subset(data.load_dataset(args.data, args.data_dir, "train",
                                             data.eval_transform(args.data, args.img_size)), args.subset, args.seed)
    N = len(train_set)
    if args.batch_size > N:
        fail(f"--batch-size {args.batch_size} is larger than the data set (N = {N}): use a smaller batch")
    if args.batch_size % args.world_size:
        fail(f"--batch-size {args.batch_size} must be divisible by the number of processes ({args.world_size})")
    if args.instance_loss == "none" and (args.cluster_warmup_epochs > 0 or args.cluster_weight == 0):
        fail("--instance-loss none trains on the cluster loss alone ('SiamMM w/o i'): it needs --cluster-weight > 0 "
             "and no --cluster-warmup-epochs")
    if args.num_clusters > N:
        fail(f"--num-clusters {args.num_clusters} is larger than the data set (N = {N}): use fewer clusters")
    sampler = torch.utils.data.DistributedSampler(train_set, args.world_size, args.rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size // args.world_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=args.dev.type == "cuda",
                                         drop_last=True)  # workers re-seeded from the (checkpointed) RNG each epoch
    feat_loader = feature_loader(feat_set, args)
    steps_per_epoch = len(loader)

    # ---- model, optimiser
    model = SiamMM(in_chans=data.in_channels(args.data), **model_args(vars(args)))
    torch.manual_seed(args.seed + args.rank)  # then each rank draws its own augmentations
    np.random.seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    if args.distributed and args.dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # sec. 5.1 / MoCo v3: BN over the global batch
    model = model.to(args.dev)
    if args.dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.local_rank] if args.dev.type == "cuda" else None)
    optimizer = build_optimizer(raw.online_parameters(), args)
    scaler = torch.amp.GradScaler("cuda", enabled=args.dev.type == "cuda" and args.amp == "fp16")
    mixture = VMFMixture(args.dim, args.num_clusters, args.kappa, args.pca_dim, args.init_iters, args.kmeans_iters,
                         reinit=args.reinit_centroids, nredo=args.nredo, kappa_clip=args.kappa_clip, seed=args.seed,
                         device=args.dev)

    # ---- resume
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pth")
    start_epoch = 0
    bank = None   # --features targets: this rank's rows of last epoch's momentum targets (feature_bank_update)
    owned = [owned_rows(N, args, r) for r in range(args.world_size)] if args.features == "targets" else None
    resume = ckpt_path if args.resume == "auto" else args.resume
    ckpt = torch.load(resume, map_location="cpu", weights_only=False) if resume and os.path.exists(resume) else None
    agree_on_resume(ckpt["epoch"] if ckpt else None, resume, args)
    if ckpt:
        saved = ckpt["args"]
        for k, was in (model_args(saved) | {"data": saved["data"]}).items():
            if was != getattr(args, k):
                fail(f"cannot resume {resume}: it was trained with --{k.replace('_', '-')} {was}, "
                     f"this run has {getattr(args, k)}; use the same setting or another --out-dir")
        # Every other flag comes from this command line, as in MoCo v3: a resumed run may
        # change lambda or extend --epochs (which stretches the cosine schedules). Say so.
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in sorted(saved)
                   if k not in RUN_FLAGS and k in vars(args) and saved[k] != getattr(args, k)]
        if changed and args.master:
            print(f"note: from epoch {ckpt['epoch'] + 1} on, this run differs from the checkpoint's flags: "
                  + ", ".join(changed))
        try:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:  # a checkpoint of another code version or model
            fail(f"cannot resume {resume}: its weights do not fit this model "
                 f"({str(e).splitlines()[0]}); start a new --out-dir")
        if scaler.is_enabled() and ckpt["scaler"]:   # empty when saved by a bf16, fp32 or CPU run
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt["mixture"] is not None:
            mixture.load_state_dict(ckpt["mixture"])
        start_epoch = ckpt["epoch"]
        bank = load_bank(os.path.dirname(resume), start_epoch, N, args)
        set_rng_state(ckpt["rng"][args.rank] if args.rank < len(ckpt["rng"]) else ckpt["rng"][0], args.dev)
        if args.master:
            print(f"resumed from {resume} at epoch {start_epoch}")
    elif args.resume and args.resume != "auto":
        fail(f"--resume {args.resume}: no such checkpoint")

    if args.master:
        print(f"SiamMM | {args.arch} on {args.data} (N = {N}) | {args.world_size} x {args.dev.type} | "
              f"batch {args.batch_size} | {args.epochs} epochs | K0 = {args.num_clusters} | E-step search: {search_backend(args.dev)}")
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(saved_args(args), f, indent=1)
    log_path = os.path.join(args.out_dir, "log.jsonl")

    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        times = {}
        sampler.set_epoch(epoch)
        # ---- 1-2. feature pass and E/M step (sec. 5.1), unless still in cluster warm-up
        use_clusters = epoch >= args.cluster_warmup_epochs and args.cluster_weight > 0
        centroids = kappa = nbr_table = w_table = None
        if use_clusters:
            t0 = time.time()
            # --features targets still runs the pass in its first clustering epoch (no targets
            # yet) and in the last: the mixture saved for use is then fit on clean views, the
            # kind evaluate.py assigns (fit on augmented targets, some centroids hold no clean
            # image and the learned clusters score lower: bench/RESULTS.md)
            source = "pass" if bank is None or epoch == args.epochs - 1 else "bank"
            if source == "pass":
                feats, index = feature_pass(raw, feat_loader, args)
                if args.features == "targets":
                    bank = feats.clone()   # the pass returns exactly this rank's owned rows, in order
            else:              # last epoch's targets for this rank's rows, the feature pass's cut
                index, feats = owned[args.rank], bank
            times["features"] = time.time() - t0
            t0 = time.time()
            mixture.fit(feats, index, N)
            nbr_table, w_table = assignment_table(mixture, feats, index, N, args)
            centroids, kappa = mixture.centroids.to(args.dev), mixture.kappa_for_loss().to(args.dev)
            times["clustering"] = time.time() - t0
            del feats
        # ---- 3. training epoch, eq. 13
        t0 = time.time()
        meter = LossMeter(args.dev, skips_allowed=scaler.is_enabled())
        collect = bank is not None               # implies --features targets and clusters in use
        seen_idx, seen_k = [], []                # --features targets: this epoch's momentum targets
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.master, leave=False)
        for i, ((x1, x2), _, idx) in enumerate(bar):
            t = epoch + i / steps_per_epoch
            lr = lr_at(t, args)
            for g in optimizer.param_groups:
                g["lr"] = lr
            m = momentum_at(t, args.epochs, args.momentum)
            x1, x2 = data.to_input(x1, args.data, args.dev), data.to_input(x2, args.data, args.dev)
            with autocast(args.dev, args.amp):
                q1, q2, k1, k2 = model(x1, x2)
            q1, q2, k1, k2 = q1.float(), q2.float(), k1.float(), k2.float()
            if collect:
                seen_idx.append(idx)
                seen_k.append(F.normalize(k1 + k2, dim=1))
            nbr = w = None
            if use_clusters:
                idx = idx.to(args.dev)
                nbr, w = nbr_table[idx], w_table[idx]
            loss, l_inst, l_clus = siammm_loss(q1, q2, k1, k2, centroids, kappa, nbr, w, args.cluster_weight,
                                               args.instance_loss, args.cluster_loss, args.infonce_t,
                                               args.neg_t, args.num_neg)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            raw.update_momentum(m)
            meter.add(loss, l_inst, l_clus)
            if i % 20 == 0 or i == steps_per_epoch - 1:
                problem = meter.check()
                if problem:
                    bar.close()
                    kept = (f"the last good checkpoint, {ckpt_path}, is kept" if os.path.exists(ckpt_path)
                            else "no checkpoint was written yet")
                    fail(f"{problem} at epoch {epoch + 1}, step {i}: training diverged; lower --lr ({kept})")
                s = meter.means()
                bar.set_postfix(loss=f"{s[0]:.4f}", inst=f"{s[1]:.4f}", clus=f"{s[2]:.4f}", lr=f"{lr:.3g}")
        if args.distributed:
            dist.all_reduce(meter.sums)
        times["training"] = time.time() - t0
        if collect:
            t0 = time.time()
            bank = feature_bank_update(bank, owned, torch.cat(seen_idx).cpu(), torch.cat(seen_k).cpu(), args)
            times["bank"] = time.time() - t0
        del seen_idx, seen_k
        # ---- 4. merging, eq. 11: rank 0 merges and sends the result to the others, so all
        # ranks hold bit-identical mixtures even where Faiss / BLAS differ between nodes
        merged, thresh = 0, float("nan")
        if use_clusters and not args.no_merge:
            t0 = time.time()
            if args.master:
                merged, thresh = mixture.merge(args.merge_lambda, min_clusters=args.min_clusters)
            if args.distributed:
                box = [(mixture.centroids, mixture.counts, mixture.kappa, merged, thresh)]
                dist.broadcast_object_list(box, src=0)
                mixture.centroids, mixture.counts, mixture.kappa, merged, thresh = box[0]
            times["merging"] = time.time() - t0
        if use_clusters:
            mixture.k_history.append(int(mixture.centroids.shape[0]))
        # ---- log and checkpoint (every rank saves its shard of the bank first)
        if bank is not None:
            shard = {"epoch": epoch + 1, "n_total": N, "world_size": args.world_size,
                     "feature_batch_size": args.feature_batch_size, "rows": bank}
            atomic_save(shard, bank_path(args.out_dir, args.rank))
            if args.save_every and (epoch + 1) % args.save_every == 0:
                atomic_save(shard, bank_path(args.out_dir, args.rank, epoch + 1))
        avg = meter.means()
        rec = {"epoch": epoch + 1, "loss": avg[0], "loss_inst": avg[1], "loss_clus": avg[2], "lr": lr, "momentum": m,
               "time": {k: round(v, 3) for k, v in times.items()} | {"epoch": round(time.time() - t_epoch, 3)},
               "images_per_s": steps_per_epoch * args.batch_size / times["training"]}
        if use_clusters:
            rec |= mixture.summary() | {"merged": merged, "merge_threshold": thresh, "feature_source": source}
        if args.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            k_txt = f" | K {rec['K']} (merged {merged})" if use_clusters else ""
            print(f"epoch {epoch + 1}/{args.epochs} | loss {avg[0]:.4f} (inst {avg[1]:.4f}, clus {avg[2]:.4f})"
                  f"{k_txt} | {rec['images_per_s']:.0f} img/s | {rec['time']['epoch']:.0f}s")
            ckpt = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "mixture": mixture.state_dict() if mixture.centroids is not None else None,
                    "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "args": saved_args(args),
                    "rng": gather_rng(args)}
            atomic_save(ckpt, ckpt_path)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                atomic_save(ckpt, os.path.join(args.out_dir, f"checkpoint_epoch{epoch + 1}.pth"))
        elif args.distributed:
            gather_rng(args)
        if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch:
            break
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return mixture


def load_bank(run_dir, epoch, n_total, args):
    """This rank's shard of the --features targets bank saved with the checkpoint of `epoch`,
    or None (then the next clustering epoch refills the bank with a feature pass): no file, a
    shard of another epoch (a crash between the two saves), or another world size or cut."""
    path = bank_path(run_dir, args.rank)
    if args.features != "targets" or not os.path.exists(path):
        return None
    shard = torch.load(path, map_location="cpu", weights_only=False)
    same = (shard["epoch"], shard["n_total"], shard["world_size"], shard["feature_batch_size"]) == \
        (epoch, n_total, args.world_size, args.feature_batch_size)
    if not same and args.master:
        print(f"{path} does not fit this run (epoch, data size, world size or --feature-batch-size differ): "
              f"the next epoch re-embeds the data with a feature pass")
    return shard["rows"] if same else None


def search_backend(dev):
    """What runs the E-step's nearest-centroid search (cluster.knn_search), said at start."""
    if dev.type != "cuda":
        return f"Faiss on the CPU ({torch.get_num_threads()} threads)"
    return f"Faiss on {dev}" if faiss_has_gpu() else f"torch on {dev} (this Faiss has no GPU support)"


def agree_on_resume(epoch, path, args):
    """Every rank must resume from the same epoch. Nodes without a shared --out-dir see
    different files: the ranks that find no checkpoint would start from scratch while the
    others resume, and the replicas would drift apart without a word. Stop instead."""
    if not args.distributed:
        return
    seen = [None] * args.world_size
    dist.all_gather_object(seen, epoch)
    if len(set(seen)) > 1:
        where = ", ".join(f"rank {r}: {'epoch ' + str(e) if e is not None else 'none'}" for r, e in enumerate(seen))
        fail(f"the ranks see different checkpoints at {path or 'OUT_DIR/checkpoint.pth'} ({where}): put --out-dir "
             "on a file system that every node shares, or copy the checkpoint to every node")


def gather_rng(args):
    """Every rank's RNG state (rank 0 saves them all), so a resumed run draws the same
    augmentations on every rank as the uninterrupted one would have."""
    state = rng_state(args.dev)
    if not args.distributed:
        return [state]
    out = [None] * args.world_size
    dist.all_gather_object(out, state)
    return out


if __name__ == "__main__":
    main()
