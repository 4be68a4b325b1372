"""
SiamMM pre-training (arXiv 2511.05462): a Siamese ResNet with a momentum encoder, trained
with the instance loss (eq. 12) plus the likelihood of a von Mises-Fisher mixture (eq. 9,
10) that is refit every epoch and merged down from K0 clusters towards the number of
classes (eq. 11).

On a CPU, no arguments: Fashion-MNIST (apt-get install dataset-fashion-mnist), about 10 minutes on 2 cores
    $ python train.py
One GPU:
    $ python train.py --preset imagenet-100ep --data-dir /datasets/imagenet --batch-size 512
8 GPUs on one node (the paper's setting: batch 4096, ResNet-50):
    $ torchrun --standalone --nproc_per_node=8 train.py --preset imagenet-100ep --data-dir /datasets/imagenet
2 nodes of 8 GPUs (run on each node, --node_rank 0 and 1; --out-dir on a shared file system):
    $ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py --preset imagenet-200ep --data-dir /datasets/imagenet --out-dir /shared/runs/in200
Each run lives in its --out-dir (default runs/PRESET). Rerunning the same command continues
from OUT_DIR/checkpoint.pth: after a crash, a kill, a preemption or a job's time limit. A
SIGTERM or SIGUSR1 (Slurm: preemption, --signal) makes every rank finish its step and save a
mid-epoch checkpoint first (slurm.sbatch is a recipe for nodes of 8 GPUs). --resume none
starts afresh in the same folder, moving the earlier run's files to OUT_DIR/replaced/.

Each epoch is the paper's training procedure (sec. 5.1), one function per step:
  1. feature pass   the momentum encoder embeds every training image (evaluation view)
  2. E/M step       k-means warm-started from last epoch's centroids (sec. 4.3), mu (eq. 6),
                    kappa (eq. 7 / 16), each image's nearest centroids and weights (eq. 10)
                    -> cluster_step() does 1 and 2 (cluster.py holds the mixture)
  3. training       L = L_inst + lambda_c L_clus (eq. 13) -> train_one_epoch()
  4. merging        close clusters merge (eq. 11) -> merge_step()
and then a checkpoint and one line of log.jsonl (save_checkpoint, log_epoch). What keeps a
run alive (the out-dir lock, resume, signals, divergence checks) is run_safety.py.
"""

import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import run_safety
import utils
from cluster import MERGE_RULES, Assignment, VMFMixture
from loss import CLUSTER_LOSSES, INSTANCE_LOSSES, siammm_loss
from model import ARCH_HELP, ModelConfig, check_arch, is_resnet
from search import search_backend
from utils import UserError, autocast

# ----------------------------------------------------------------------------- config
# Presets set defaults; any flag given on the command line wins over its preset.
PRESETS = {
    # The embedded default: Fashion-MNIST on a 2-core CPU in about 10 minutes. Small stem for
    # 28 px images, a quarter-width resnet18 (about 7x the images/s of width 64: speed matters
    # more than capacity at this budget), small heads, a 5k-image subset, SGD (LARS is for
    # large batches). The merging threshold lambda is grid-searched per data set, as the paper
    # advises (sec. 5.1): 1.625 takes K from 500 to about the 10 classes in 48 epochs. Every
    # run behind these values: bench/RESULTS.md, "Choosing the CPU default".
    "cpu": dict(data="fashion-mnist", arch="resnet18", small_stem=True, width=16, img_size=16, subset=5000,
                proj_hidden=512, pred_hidden=512, dim=128, pca_dim=64, batch_size=128, epochs=48,
                optimizer="sgd", lr=0.06, weight_decay=5e-4, warmup_epochs=0, ema_momentum=0.99,
                num_clusters=500, crop_min=0.2, aug="moco", workers=2, merge_rule="eq11", merge_lambda=1.625),
    # sec. 5.1: ResNet-50, 3-layer 4096-d projector, 2-layer predictor, 256-d, K0 = 100,000,
    # LARS (wd 1e-6, momentum 0.9), batch 4096, cosine lr, MoCo v3 augmentations. The base lr
    # values are MoCo v3's ResNet-50 ones, and MoCo v3's ResNet-50 recipes (its CONFIG.md)
    # crop with --crop-min .2. lambda of eq. 11 (sec. 5.1: "a percentile of the normalised
    # pairwise distance"): 2.0 merges pairs below about the 2nd percentile, were d Gaussian.
    # The merge rule is the paper's eq. 11: the likelihood rule (--merge-rule bic) needs no
    # lambda and finds K on fixed features, but in training on Fashion-MNIST it kept 75
    # clusters for 10 classes (bench/RESULTS.md, "Where K stops").
    "imagenet-100ep": dict(data="imagenet", arch="resnet50", small_stem=False, width=64, img_size=224, subset=0,
                           proj_hidden=4096, pred_hidden=4096, dim=256, pca_dim=150, batch_size=4096,
                           epochs=100, optimizer="lars", lr=0.6, weight_decay=1e-6, warmup_epochs=10,
                           ema_momentum=0.99, num_clusters=100000, crop_min=0.2, aug="moco", workers=10, merge_rule="eq11",
                           merge_lambda=2.0),
}
PRESETS["imagenet-200ep"] = PRESETS["imagenet-100ep"] | dict(epochs=200, lr=0.5)   # the same run, twice as long


def get_args(argv=None):
    p = utils.ArgumentParser(prog="train.py", description="SiamMM pre-training",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a setting; flags override (default: cpu, "
                   "the Fashion-MNIST demo; the paper's: imagenet-100ep, imagenet-200ep)")
    # data
    p.add_argument("--data", choices=data.NAMES, help="data set")
    p.add_argument("--data-dir", default="", help="fashion-mnist: idx files (default /usr/share/datasets/fashion-mnist); "
                   "folder/imagenet: a folder with train/ and val/")
    p.add_argument("--download", action="store_true", help="fashion-mnist: download with torchvision if missing (needs internet)")
    p.add_argument("--feature-data-dir", default="",
                   help="folder/imagenet: a resized copy of --data-dir (python data.py SRC DST) that the feature pass "
                        "reads instead: ImageNet decodes ~2x faster at 256 px (bench/bench_loader.py)")
    p.add_argument("--subset", type=int, help="train on a seeded random subset of this many images (0 = all)")
    p.add_argument("--img-size", type=int, help="crop size of the training views")
    p.add_argument("--crop-min", type=float, help="smallest RandomResizedCrop scale")
    p.add_argument("--aug", choices=data.AUGMENTATIONS,
                   help="training views: moco = MoCo v3's (sec. 5.1, ImageNet); shapes = crop, small rotation and "
                        "shift, brightness/contrast, for small grayscale images (data.shapes_view)")
    p.add_argument("--hflip", type=float, default=0.5,
                   help="--aug shapes: horizontal flip probability (0 for digits or text, whose mirror images differ)")
    p.add_argument("--rotate", type=float, default=15.0, help="--aug shapes: largest rotation, degrees")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU/process")
    # model (sec. 5.1)
    p.add_argument("--arch", help=ARCH_HELP)
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 stem, no max-pool (28-64 px images)")
    p.add_argument("--width", type=int, help="channels of the stem and first stage; stages are x1, x2, x4, x8 (torchvision: 64)")
    p.add_argument("--proj-hidden", type=int, help="projector hidden width (paper 4096)")
    p.add_argument("--pred-hidden", type=int, help="predictor hidden width (paper 4096)")
    p.add_argument("--dim", type=int, help="embedding dimension D (paper 256)")
    p.add_argument("--ema-momentum", type=float, help="m0 of the momentum encoder's EMA, cosine-scheduled to 1 "
                   "(MoCo v3's --moco-m; SGD's momentum is fixed at 0.9)")
    # optimisation (sec. 5.1)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="total over all GPUs")
    p.add_argument("--optimizer", choices=["lars", "sgd"])
    p.add_argument("--lr", type=float, help="base lr; the actual lr is lr x batch-size / 256")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up, then cosine decay")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--feature-amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="precision of the feature pass on CUDA (none = fp32); its embeddings go to k-means in fp32 "
                        "(bench/check_gpu_data.py measures the bf16-fp32 cosine)")
    # the mixture model (sec. 4)
    p.add_argument("--num-clusters", type=int, help="initial number of clusters K0 (paper 100,000)")
    p.add_argument("--kappa-estimator", default="pca", choices=["pca", "banerjee", "const"],
                   help="concentration kappa: eq. 16 (PCA, the paper's), eq. 7 (Banerjee et al.'s approximation of "
                        "the maximum-likelihood kappa in all D dimensions) or constant (Table 7 ablation)")
    p.add_argument("--pca-dim", type=int, help="d', principal components for eq. 16 (paper 150 of 256)")
    p.add_argument("--kappa-clip", type=float, default=10.0,
                   help="kappa's spread: each estimate is capped at this times their median, and in the loss "
                        "(kappa normalised to mean 1) at this")
    p.add_argument("--kmeans-iters", type=int, default=3, help="Lloyd iterations per epoch, warm-started (sec. 4.3)")
    p.add_argument("--init-iters", type=int, default=20, help="Lloyd iterations of the first (and re-initialised) k-means")
    p.add_argument("--feature-bn", default="batch", choices=["batch", "running"],
                   help="BN statistics of the feature pass: each batch's own, as when the momentum branch makes the "
                        "targets k, or (an ablation) the eval-mode running ones, which collapse the mixture "
                        "(SiamMM.embed; bench/RESULTS.md)")
    p.add_argument("--feature-batch-size", type=int, default=256,
                   help="images per batch of the feature pass, per process (the same cut on any number of GPUs)")
    p.add_argument("--reinit-centroids", action="store_true",
                   help="ablation (Table 7, Fig. 7): fresh k-means every epoch with --nredo restarts, PCL style")
    p.add_argument("--nredo", type=int, default=5, help="restarts with --reinit-centroids")
    p.add_argument("--soft-k", type=int, default=3, help="s, nearest centroids per sample (eq. 10); 1 = hard assignment (eq. 8, Table 6)")
    p.add_argument("--tau", type=float, default=0.1, help="temperature of the soft assignment (eq. 10)")
    p.add_argument("--assign-prior", action="store_true", help="add log pi_k to the eq. 10 logits")
    p.add_argument("--merge-rule", choices=sorted(MERGE_RULES),
                   help="which pairs of clusters merge after each epoch (cluster.MERGE_RULES): eq11, the paper's "
                        "(presets); bic, one vMF against two, no lambda; views: bic or closer than two views")
    p.add_argument("--merge-lambda", type=float, help="lambda of eq. 11; merge if d < E[d] - lambda sigma[d] "
                   "(preset: 1.625 on the CPU, 2.0 on ImageNet)")
    p.add_argument("--births", type=float, default=0.0,
                   help="split moves: each epoch seed this fraction of K new clusters where the mixture fits worst "
                        "(VMFMixture._seeds); merging removes those that are not distinct")
    p.add_argument("--no-merge", action="store_true", help="ablation (Table 5): keep K fixed")
    p.add_argument("--min-clusters", type=int, default=2, help="merging never takes K below this")
    p.add_argument("--cluster-warmup-epochs", type=int, default=0, help="epochs of instance loss only before the first clustering")
    # the loss (eq. 13) and its ablations (Tables 4, 8)
    p.add_argument("--cluster-weight", type=float, default=1.0, help="lambda_c of eq. 13")
    p.add_argument("--instance-loss", default="byol", choices=sorted(INSTANCE_LOSSES),
                   help="eq. 12; infonce = 'SiamMM w/ negative inst'; none = 'SiamMM w/o i' (Table 4)")
    p.add_argument("--cluster-loss", default="mle", choices=sorted(CLUSTER_LOSSES),
                   help="eq. 9; eq. 14 negative centroids; eq. 15 negative instances (Table 8)")
    p.add_argument("--infonce-t", type=float, default=1.0, help="InfoNCE temperature (MoCo v3 ResNet: 1.0)")
    p.add_argument("--neg-t", type=float, default=0.2, help="temperature of eq. 14 / 15")
    p.add_argument("--num-neg", type=int, default=16000, help="negative centroids per batch for eq. 14 (PCL: 16000)")
    run_safety.add_run_flags(p, "runs/PRESET")
    p.add_argument("--save-every", type=int, default=0, help="also keep checkpoint_epochN.pth every N epochs")
    args = p.parse_args(argv)
    args.preset_given = args.preset is not None   # the card's bare command on a GPU says what it runs
    args.preset = args.preset or "cpu"
    if args.arch and not is_resnet(args.arch):   # the preset's ResNet options are not for another --arch
        args.small_stem, args.width = bool(args.small_stem), 64 if args.width is None else args.width
    pca_dim_given = args.pca_dim is not None
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not pca_dim_given and args.dim is not None:   # a preset's d' follows a smaller --dim; a given one is checked
        args.pca_dim = min(args.pca_dim, args.dim)
    args.out_dir = args.out_dir or os.path.join("runs", args.preset)
    utils.check_keywords(p, KEYWORD_FLAGS)
    check_args(p, args)
    return args


# Flags reach the losses and merge rules by name (siammm_loss(**vars(args)), merge(**vars(args))):
# each family's functions, the arguments their caller passes, and the family's own flags, which
# utils.check_keywords holds them to at start-up. (A merge rule's `neighbours`, candidate
# pairs per cluster, is its caller's: tests pass it.)
KEYWORD_FLAGS = {"instance_loss": (INSTANCE_LOSSES, ("q1", "q2", "k1", "k2"), ("infonce_t",)),
                 "cluster_loss": (CLUSTER_LOSSES, ("q", "k", "a"), ("neg_t", "num_neg")),
                 "merge_rule": (MERGE_RULES, ("mixture", "view_distance", "neighbours"), ("merge_lambda",))}


def check_args(p, args):
    """Ranges, checked before any work starts: a value that makes the run fail later, or
    do nothing, or go silently wrong stops here with one line that names the flag."""
    utils.check_flags(p, args,
                      positive=("epochs", "batch_size", "img_size", "width", "proj_hidden", "pred_hidden", "dim",
                                "pca_dim", "num_clusters", "soft_k", "tau", "init_iters", "nredo", "min_clusters",
                                "infonce_t", "neg_t", "num_neg", "dist_timeout"),
                      non_negative=("subset", "workers", "weight_decay", "warmup_epochs", "kmeans_iters", "births",
                                    "cluster_warmup_epochs", "cluster_weight", "stop_after_epoch", "save_every",
                                    "checkpoint_minutes"),
                      fractions=("crop_min",))
    if not 0 <= args.hflip <= 1:
        p.error(f"--hflip {args.hflip}: a probability, in [0, 1]")
    if not 0 <= args.rotate <= 180:
        p.error(f"--rotate {args.rotate}: the largest rotation lies in [0, 180] degrees")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr {args.lr}: must be a positive number (the base lr; the actual lr is lr x batch-size / 256)")
    if not 0 <= args.ema_momentum <= 1:
        p.error(f"--ema-momentum {args.ema_momentum}: the EMA momentum m0 lies in [0, 1]")
    if args.feature_data_dir and args.data == "fashion-mnist":
        p.error("--feature-data-dir is for image folders (--data folder or imagenet): Fashion-MNIST is read from memory")
    if args.pca_dim > args.dim:   # only a --pca-dim given on the command line can be (get_args)
        p.error(f"--pca-dim {args.pca_dim} is larger than --dim {args.dim}: eq. 16 estimates kappa in d' <= D "
                "principal directions (paper 150 of 256)")
    if not math.isfinite(args.merge_lambda):
        p.error(f"--merge-lambda {args.merge_lambda}: must be a number (eq. 11's threshold E[d] - lambda sigma[d])")
    if not args.kappa_clip >= 1:
        p.error(f"--kappa-clip {args.kappa_clip}: must be at least 1 (kappa is normalised to mean 1, then clipped)")
    if args.feature_batch_size < 2:
        p.error(f"--feature-batch-size {args.feature_batch_size}: must be at least 2 (batch-statistics BN)")
    try:   # before any data is loaded
        check_arch(args.arch, args.small_stem, args.width, args.img_size)
    except UserError as e:
        p.error(str(e))
    if args.instance_loss == "none" and (args.cluster_warmup_epochs > 0 or args.cluster_weight == 0):
        p.error("--instance-loss none trains on the cluster loss alone ('SiamMM w/o i'): it needs --cluster-weight > 0 "
                "and no --cluster-warmup-epochs")


# ----------------------------------------------------------------------------- optimisation (sec. 5.1)
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
    """The learning rate at fractional epoch t (set every iteration): lr x batch / 256 (Goyal
    et al.), reached by a linear warm-up over --warmup-epochs, then half a cosine to 0."""
    return utils.cosine_schedule(t, args.epochs, args.lr * args.batch_size / 256, warmup=args.warmup_epochs)


def preset_note(args):
    """The first line of the card's bare command, torchrun --nproc_per_node=8 train.py, on GPUs:
    without --preset it runs the CPU demo (what `python train.py` on a laptop should do), and
    says so, and what runs the paper's."""
    if args.device.type == "cuda" and not args.preset_given:
        return ("no --preset: this runs the CPU demo (Fashion-MNIST, a small ResNet-18 at 16 px, into runs/cpu); "
                "the paper's ImageNet runs: --preset imagenet-100ep (or imagenet-200ep) --data-dir DIR")
    return None


def model_config(args):
    """The model's shape from the flags, and the data's channels."""
    shape = {f: getattr(args, f) for f in ("arch", "small_stem", "width", "proj_hidden", "pred_hidden", "dim")}
    return ModelConfig(in_chans=data.SPECS[args.data].channels, **shape)


# ----------------------------------------------------------------------------- steps 1-2: feature pass, E/M step
@torch.no_grad()
def feature_pass(model, loader, args):
    """Step 1: z_i = the momentum embedding of every training image (evaluation view), this
    rank's share (data.feature_loader). Returns (features n_r x D on the CPU, dataset indices n_r)."""
    model.eval()  # with --feature-bn batch, embed() switches BN to batch statistics itself
    feats, index = [], []
    batches = iter(loader)
    try:   # the workers ignore SIGTERM (run_safety.Checkpoints acts on it after the pass): end them here on every way out
        for x, _, idx in tqdm(batches, total=len(loader), desc="  features", disable=not args.master, leave=False):
            x = data.to_input(x, args.data, args.device)
            with autocast(args.device, args.feature_amp):
                z = model.embed(x, args.feature_bn, args.local_group)
            feats.append(z.float().cpu())
            index.append(idx)
    finally:
        data.close_iterator(batches)
    model.train()
    if not feats:   # more ranks than batches: this rank holds no sample
        return torch.zeros(0, args.dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(index)


def cluster_step(model, mixture, loader, n_total, args, times):
    """Steps 1 and 2 (sec. 5.1): the feature pass, then the E/M step on its features: k-means
    warm-started from last epoch's centroids (sec. 4.3), kappa (eq. 7 / 16), and each
    image's s nearest centroids with their eq. 10 weights as N x s tables on the device.
    Returns the epoch's cluster.Assignment."""
    t0 = time.time()
    feats, index = feature_pass(model, loader, args)
    times["features"] = time.time() - t0
    t0 = time.time()
    mixture.fit(feats, index, n_total)
    assignment = mixture.assignment_table(feats, index, n_total, args.soft_k, args.tau, args.assign_prior, args.device)
    times["clustering"] = time.time() - t0
    return assignment


# ----------------------------------------------------------------------------- step 3: training
def train_one_epoch(model, loader, optimizer, scaler, assignment, epoch, args, times, checkpoints, start=None):
    """Step 3: one pass over the shuffled training set with L = L_inst + lambda_c L_clus
    (eq. 13). lr and the EMA momentum follow their schedules per iteration (sec. 5.1, MoCo
    v3); each image's cluster assignment is looked up by its dataset index in the tables
    of this epoch's E-step (assignment is None in cluster warm-up epochs: eq. 12 only).
    After every step but the last, the ranks agree whether to checkpoint mid-epoch (run_safety);
    start: (step, LossSums) of a run resumed mid-epoch. Returns the log fields of the epoch."""
    module = model.module if args.distributed else model
    first, meter = start or (0, run_safety.LossSums(args.device, skips_allowed=scaler.is_enabled()))
    t0, steps = time.time(), first + len(loader)   # the loader holds the steps not yet taken
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.master, leave=False,
               initial=first, total=steps)
    for i, ((x1, x2), _, idx) in enumerate(bar, first):
        t = epoch + i / steps
        lr, m = lr_at(t, args), utils.cosine_schedule(t, args.epochs, args.ema_momentum, final=1.0)   # MoCo v3: m0 -> 1
        for g in optimizer.param_groups:
            g["lr"] = lr
        x1, x2 = data.to_input(x1, args.data, args.device), data.to_input(x2, args.data, args.device)
        with autocast(args.device, args.amp):
            q1, q2, k1, k2 = model(x1, x2)
        rows = assignment.rows(idx.to(args.device, non_blocking=True)) if assignment else None   # by dataset index
        loss, l_inst, l_clus = siammm_loss(q1.float(), q2.float(), k1.float(), k2.float(), rows,
                                           instance=args.instance_loss, cluster=args.cluster_loss, **vars(args))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        module.update_momentum(m)
        # the spread augmentation gives one image: the distance 1 - k1.k2 between the momentum
        # embeddings of its two views (the 'views' merge rule reads it; logged for every run)
        meter.add(loss, l_inst, l_clus, (1 - (k1.float() * k2.float()).sum(1)).mean())
        if i % 20 == 0 or i == steps - 1:
            run_safety.check_divergence(meter, bar, epoch, i, args, "Lower --lr, or check --tau, --kappa-clip and the data")
            bar.set_postfix(dict(zip(("loss", "inst", "clus"), (f"{v:.4f}" for v in meter.means()[:3]))) | {"lr": f"{lr:.3g}"})
        checkpoints.after_step(i, steps, epoch, bar, args, lambda: run_safety.MidEpoch(   # noqa: B023 (called at once)
            i + 1, meter.state_dict(), assignment and {k: v.cpu() for k, v in vars(assignment).items()}))
    if args.distributed:
        dist.all_reduce(meter.sums)
    times["training"] = time.time() - t0
    loss, l_inst, l_clus, views = meter.means()
    return {"loss": loss, "loss_inst": l_inst, "loss_clus": l_clus, "view_distance": views, "lr": lr, "momentum": m,
            "images_per_s": (steps - first) * args.batch_size / times["training"]}


# ----------------------------------------------------------------------------- step 4: merging
def merge_step(mixture, view_distance, args, times):
    """Step 4: merge clusters (sec. 4.2) by the rule of --merge-rule (eq. 11 by default;
    view_distance: this epoch's mean distance between two views of one image, which the
    'views' rule compares centroids with). Rank 0 merges and sends its whole mixture state
    (state_dict: what a checkpoint saves) to the others, so all ranks hold bit-identical
    mixtures even where Faiss or BLAS differ between nodes. Returns (merges, the rule's log
    entries)."""
    t0 = time.time()
    merged, info = 0, {}
    if not args.no_merge:
        if args.master:
            merged, info = mixture.merge(**vars(args), view_distance=view_distance)
        if args.distributed:
            box = [(mixture.state_dict(), merged, info)]
            dist.broadcast_object_list(box, src=0)
            state, merged, info = box[0]
            mixture.load_state_dict(state)
    mixture.k_history.append(int(mixture.centroids.shape[0]))
    times["merging"] = time.time() - t0
    return merged, info


# ----------------------------------------------------------------------------- checkpoints, log, resume
# Flags that say where and how this process runs, not what it trains: a resume may change
# them without a note (the world size too: --batch-size is the total over all processes).
RUN_FLAGS = {"out_dir", "resume", "stop_after_epoch", "save_every", "workers", "device", "data_dir", "feature_data_dir",
             "download", "distributed", "rank", "world_size", "local_rank", "master", "dist_timeout",
             "checkpoint_minutes", "preset_given", "data_fingerprint"}
# Flags a resume cannot change: the images trained on (a subset is drawn from --seed, and each
# image's views from it), and K0 once the first clustering has used it. A resume refuses them
# in one line rather than going on with other data or a flag that would do nothing.
FIXED_FLAGS = {"subset": "which images are trained on", "seed": "the subset and every image's views",
               "num_clusters": "K0, used by the first clustering"}


def save_checkpoint(model, optimizer, scaler, mixture, epoch, steps, args, within=None):
    """Everything a resumed run needs to continue exactly: weights, the model's shape,
    optimiser, AMP scaler, mixture, epoch and step, every rank's RNG state, the flags. Rank 0
    writes it atomically (run_safety.atomic_save); every rank takes part in gathering the RNG
    states. within: a run_safety.MidEpoch after `step` steps of epoch `epoch` ("epoch" then
    counts the epochs completed), with the epoch's E-step tables (ImageNet N x s = 1.28M x 3
    nbr and w, 46 MB) and its loss sums so far."""
    rng = utils.gather_rng(args)
    if not args.master:
        return
    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(model_config(args)),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "mixture": mixture.state_dict() if mixture.centroids is not None else None,
            "epoch": epoch + (within is None), "step": epoch * steps + (within.step if within else steps),
            "within": vars(within) if within else None, "args": run_safety.saved_args(args), "rng": rng}
    paths = [os.path.join(args.out_dir, "checkpoint.pth")]
    if within is None and args.save_every and (epoch + 1) % args.save_every == 0:
        paths.append(os.path.join(args.out_dir, f"checkpoint_epoch{epoch + 1}.pth"))
    run_safety.atomic_save(ckpt, *paths)


def log_epoch(record, mixture, merge, times, t_epoch, args):
    """One JSON line per epoch in OUT_DIR/log.jsonl (rank 0), and a line on stdout: losses,
    lr, momentum, K, merges and the threshold, cluster sizes and kappa (a collapse shows as
    one giant cluster), the time of each step and images/s."""
    record["time"] = {k: round(v, 3) for k, v in times.items()} | {"epoch": round(time.time() - t_epoch, 3)}
    if merge is not None:
        record |= mixture.summary() | {"merged": merge[0]} | merge[1]
    if not args.master:
        return
    run_safety.log_line(args, record)
    k_txt = f" | K {record['K']} (merged {record['merged']})" if merge is not None else ""
    print(f"epoch {record['epoch']}/{args.epochs} | loss {record['loss']:.4f} (inst {record['loss_inst']:.4f}, "
          f"clus {record['loss_clus']:.4f}){k_txt} | {record['images_per_s']:.0f} img/s | {record['time']['epoch']:.0f}s")


def resume(ckpt, path, model, optimizer, scaler, mixture, args):
    """--resume auto / PATH: load everything save_checkpoint wrote and return the epoch to
    start from (0 without a checkpoint) and, for a mid-epoch checkpoint, its MidEpoch. The
    model flags must match the checkpoint's, and the data be the same images (they may have
    moved: a node-local copy after a requeue); other flags are checked by run_safety."""
    if ckpt is None:
        if args.master:   # a fresh run: an old run's lines would mix into Fig. 2's K curve
            run_safety.trim_log(os.path.join(args.out_dir, "log.jsonl"), 0)
        return 0, None
    saved = ckpt["args"]
    mine = dataclasses.asdict(model_config(args)) | {"data": args.data}
    for k, was in (ckpt["model_config"] | {"data": saved["data"]}).items():
        if was != mine[k]:
            flag = "--data (its channels)" if k == "in_chans" else utils.flag(k)
            raise UserError(f"cannot resume {path}: it was trained with {flag} {was}, "
                            f"this run has {mine[k]}; use the same setting or another --out-dir")
    fixed = {k: v for k, v in FIXED_FLAGS.items() if k != "num_clusters" or ckpt["mixture"] is not None}
    run_safety.check_resumed_flags(ckpt, args, path, fixed, quiet=RUN_FLAGS)
    was, now = saved.get("data_fingerprint"), getattr(args, "data_fingerprint", None)
    if was and was != now:   # another folder, or the same one changed: not the images this run trained on
        raise UserError(f"cannot resume {path}: --data-dir {args.data_dir or '(default)'} holds {now}, the run "
                        f"trained on {was} (in {saved['data_dir'] or 'the default folder'}); point --data-dir at "
                        "the same data or use another --out-dir")
    if args.master and was and saved.get("data_dir") != args.data_dir:
        print(f"note: reading the run's data from {args.data_dir} (was {saved['data_dir']}): the same {now}")
    within = run_safety.restore(ckpt, path, model, optimizer, scaler, args)
    if ckpt["mixture"] is not None:
        mixture.load_state_dict(ckpt["mixture"])
    if args.rank < len(ckpt["rng"]):
        utils.set_rng_state(ckpt["rng"][args.rank], args.device)
    else:   # more processes than saved the checkpoint: a stream of its own, not a copy of rank 0's
        utils.seed_all(args.seed + args.rank + 1000 * ckpt["epoch"])
    return ckpt["epoch"], within


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Parse the flags and train; a problem a person can fix ends in one line (utils.guard)."""
    return utils.guard("train.py", train, get_args(argv))


def train(args):
    utils.setup_distributed(args, args.dist_timeout)
    args.local_group = None   # a process group of this rank alone, for SyncBN in the feature pass
    if args.distributed and args.device.type == "cuda":   # SyncBN must not sync the feature pass (model.batch_statistics)
        args.local_group, _ = dist.new_subgroups(group_size=1)
    torch.manual_seed(args.seed)  # the model is built from the same seed on every rank
    utils.fast_cuda(args.device)

    # ---- data: labels are never used below
    views = data.train_transform(args.img_size, args.crop_min, args.aug, args.hflip, args.rotate)
    train_set = data.load_dataset(args.data, args.data_dir, "train", views, args.download)
    feat_set = data.load_dataset(args.data, args.feature_data_dir or args.data_dir, "train",
                                 data.eval_transform(args.data, args.img_size))
    if args.feature_data_dir:
        data.check_same_files(train_set, feat_set, args.img_size)
    args.data_fingerprint = data.fingerprint(train_set)   # checked on resume: the same images, wherever they live
    train_set, feat_set = data.subset(train_set, args.subset, args.seed), data.subset(feat_set, args.subset, args.seed)
    N = len(train_set)
    if args.batch_size > N:
        raise UserError(f"--batch-size {args.batch_size} is larger than the data set (N = {N}): use a smaller batch")
    if args.batch_size % args.world_size or args.batch_size // args.world_size < 2:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the number of processes "
                        f"({args.world_size}), at least 2 per process (BN)")
    if args.num_clusters > N:
        raise UserError(f"--num-clusters {args.num_clusters} is larger than the data set (N = {N}): use fewer clusters")
    sampler, loader = data.train_loader(train_set, args.batch_size // args.world_size, args)
    feat_loader = data.feature_loader(feat_set, args.feature_batch_size, args, term=True)

    # ---- model, optimiser, mixture
    model = model_config(args).build()
    utils.seed_all(args.seed + args.rank)  # then each rank draws its own augmentations
    model, module = utils.distribute(model, args)   # sec. 5.1 / MoCo v3: BN over the global batch
    optimizer = build_optimizer(module.online_parameters(), args)
    scaler = torch.amp.GradScaler("cuda", enabled=args.device.type == "cuda" and args.amp == "fp16")
    mixture = VMFMixture(args.dim, args.num_clusters, kappa_estimator=args.kappa_estimator, pca_dim=args.pca_dim,
                         init_iters=args.init_iters, kmeans_iters=args.kmeans_iters,
                         reinit_centroids=args.reinit_centroids, nredo=args.nredo, kappa_clip=args.kappa_clip,
                         births=args.births, seed=args.seed, device=args.device)
    start_epoch, within = resume(*run_safety.open_run(args, "train.py", {"model", "model_config", "args", "epoch"}),
                                 module, optimizer, scaler, mixture, args)
    checkpoints = run_safety.Checkpoints(args, lambda epoch, steps, within: save_checkpoint(
        module, optimizer, scaler, mixture, epoch, steps, args, within))
    if args.master and preset_note(args):
        print(preset_note(args), flush=True)
    if args.master:
        print(f"SiamMM | {args.arch} on {args.data} (N = {N}) | {args.world_size} x {args.device.type} | "
              f"batch {args.batch_size} | {args.epochs} epochs | K0 = {args.num_clusters} | E-step search: {search_backend(args.device)}")
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:   # an OSError: one line (utils.guard)
            json.dump(run_safety.saved_args(args), f, indent=1)

    try:
        run_epochs(model, module, optimizer, scaler, mixture, sampler, loader, feat_loader, N, start_epoch, within,
                   checkpoints, args)
    finally:
        checkpoints.close()
        data.shutdown_workers(loader)
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return mixture


def run_epochs(model, module, optimizer, scaler, mixture, sampler, loader, feat_loader, N, start_epoch, within,
               checkpoints, args):
    """The epochs: sec. 5.1's four steps each, then the log line and the checkpoint."""
    steps = len(loader)
    for epoch in range(start_epoch, args.epochs):
        t_epoch, times, start = time.time(), {}, None
        if within:   # resumed mid-epoch: this epoch's E-step and loss sums come from the checkpoint
            sampler.set_epoch(epoch, within.step * (args.batch_size // args.world_size))
            a = within.assignment
            assignment = Assignment(**{k: v.to(args.device) for k, v in a.items()}) if a else None
            meter = run_safety.LossSums(args.device, skips_allowed=scaler.is_enabled())
            meter.load_state_dict(within.meter, args.rank, args.world_size)
            start, within = (within.step, meter), None
        else:
            sampler.set_epoch(epoch)
            assignment = None
            if epoch >= args.cluster_warmup_epochs and args.cluster_weight > 0:
                assignment = cluster_step(module, mixture, feat_loader, N, args, times)                   # 1, 2
        record = {"epoch": epoch + 1} | train_one_epoch(model, loader, optimizer, scaler, assignment, epoch, args,
                                                        times, checkpoints, start)                         # 3
        merge = merge_step(mixture, record["view_distance"], args, times) if assignment else None        # 4
        log_epoch(record, mixture, merge, times, t_epoch, args)
        checkpoints.after_epoch(epoch, steps, args)   # and a signal during the last step stops here
        if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch:
            break


if __name__ == "__main__":
    main()
