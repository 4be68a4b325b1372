"""
Evaluation of SiamMM (arXiv 2511.05462): what the paper measures of a pre-trained model,
on Fashion-MNIST or any ImageFolder data set (ImageNet included), on a CPU or GPUs.

    representation  weighted kNN on frozen backbone features (DINO protocol) and a quick
                    linear probe on cached features, train split -> val split (the paper's
                    linear protocol, Table 1, and fine-tuning, Table 2: lincls.py)
    clusters        Table 3: AMI, NMI, ARI and majority-label accuracy of the learned
                    clusters; k-means with K = number of classes (Hungarian accuracy)
    floor           the same kNN and spherical k-means on raw pixels of the same images,
                    at the features' resolution (and scikit-learn's Euclidean k-means, the
                    clustering literature's floor, where it is cheap)
    cluster report  K per epoch (Fig. 2), image grids per cluster (Fig. 3), suspected
                    mislabels (sec. 6.8): report.py

A checkpoint of train.py carries everything (data, architecture, image size, the mixture):
    $ python evaluate.py --checkpoint runs/cpu/checkpoint.pth
Table 3 on ImageNet, 8 GPUs (each process embeds its share; the rest runs on rank 0):
    $ torchrun --standalone --nproc_per_node=8 evaluate.py --checkpoint runs/imagenet-100ep/checkpoint.pth \\
        --data-dir /datasets/imagenet
A quick look on subsets (the default is the full train split -> the full val split):
    $ python evaluate.py --checkpoint runs/cpu/checkpoint.pth --train-subset 10000 --test-subset 2000
A checkpoint's backbone as a torchvision state_dict (no fc), and its evaluation:
    $ python evaluate.py --checkpoint runs/in100/checkpoint.pth --export-backbone r50.pth
    $ python evaluate.py --backbone r50.pth --arch resnet50 --data imagenet --data-dir /datasets/imagenet

Under torchrun the ranks share the decoding (the cost: 1.28M + 50k images); what follows runs
on rank 0, where ImageNet's kNN (50k x 1.28M x 2048, 0.26 PFLOP in fp32) and the quick probe
(100 epochs of a 2048 x 1000 layer, ~1.6 PFLOP) take seconds to a minute on one GPU (estimated:
H100 fp32), too little to gain from sharding. The self-kNN of the mislabel vote would be
6.7 PFLOP over the train split: --mislabel-votes auto takes the cluster vote above 200,000
report images.

Scale (ImageNet: 1.28M train images, 2048-d features): every image is decoded once, and its
backbone feature, momentum embedding and raw pixels come from that one view. Features are
kept in half precision (5.2 GB for the train split), raw pixels in uint8 (3.9 GB at 32 px),
and no stage copies them whole. A stage that would not fit in memory or would take hours
on this device stops at the start with one line naming the flag that avoids it.

Output in OUT_DIR (default: <checkpoint folder>/eval): results.json, the report's figures
and mislabels.csv; a summary table on stdout.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.cluster import KMeans
from tqdm import tqdm

import data
import report
import run_safety
import utils
from cluster import VMFMixture, nearest_centroid
from model import load_checkpoint, load_pretrained
from search import knn_votes, torch_search
from utils import UserError, autocast

# ----------------------------------------------------------------------------- config
SELF_KNN_MAX = 200_000   # --mislabel-votes auto: larger report splits vote by cluster


def get_args(argv=None):
    p = utils.ArgumentParser(prog="evaluate.py", description="Evaluate a SiamMM checkpoint or backbone",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py checkpoint (model, mixture and the training flags)")
    src.add_argument("--backbone", help="an exported backbone state_dict (evaluate.py --export-backbone); "
                     "give --arch, --data, --img-size (small stem and channels are read from its conv1)")
    # data and model: unset flags are read from the checkpoint's training flags
    p.add_argument("--data", choices=data.NAMES, help="default: the checkpoint's, else fashion-mnist")
    p.add_argument("--data-dir", help="default: the checkpoint's (fashion-mnist: the Debian package's idx files)")
    p.add_argument("--download", action="store_true", help="fashion-mnist: download with torchvision if missing (needs internet)")
    p.add_argument("--img-size", type=int, help="evaluation image size; default: the training size (16 for "
                   "fashion-mnist with --backbone, the cpu preset of train.py; 224 for folders)")
    p.add_argument("--arch", help="--backbone only: torchvision ResNet name (default resnet18)")
    p.add_argument("--train-subset", type=int, default=0, help="seeded random subset of the train split (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="seeded random subset of the val split (0 = all)")
    p.add_argument("--encoder", default="online", choices=["online", "momentum"],
                   help="backbone for kNN / probe: the online f (MoCo v3's choice) or the momentum f_m")
    p.add_argument("--export-backbone", metavar="PATH",
                   help="only write the --checkpoint's --encoder backbone to PATH as a state_dict for "
                        "torchvision.models.<arch>() (no fc; MoCo v3 converts its checkpoints the same way), then "
                        "exit; evaluate.py and lincls.py read it with --backbone")
    # kNN (DINO eval_knn.py)
    p.add_argument("--knn-k", default="20", help="neighbours, comma-separated (DINO also reports 10,20,100,200)")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the votes exp(cos / T)")
    # the quick linear probe, on cached features
    p.add_argument("--probe-epochs", type=int, default=100, help="epochs on cached features (0 = no probe)")
    p.add_argument("--probe-lr", type=float, default=0.1, help="base lr; actual lr = base x batch / 256")
    p.add_argument("--probe-batch-size", type=int, default=1024, help="MoCo v3 main_lincls default")
    # clusters and the report
    p.add_argument("--metrics-split", default="test", choices=["train", "test"], help="split of the Table 3 metrics")
    p.add_argument("--report-split", default="train", choices=["train", "test"], help="split of the grids and mislabels")
    p.add_argument("--grid-clusters", type=int, default=10, help="image grids for the largest N clusters")
    p.add_argument("--grid-cols", type=int, default=12, help="images per row (per true class) in a cluster grid")
    p.add_argument("--confidence", default="cosine", choices=["cosine", "margin"],
                   help="confidence of an assignment: cosine to its centroid, or its margin over the second nearest")
    p.add_argument("--mislabel-votes", default="auto", choices=["auto", "knn", "cluster"],
                   help="who votes on each label of the report: the smallest --knn-k nearest other images (weighted, "
                        "leave-one-out) or the image's learned cluster (sec. 6.8; coarse once K nears the class count); "
                        f"auto: knn up to {SELF_KNN_MAX:,} report images, cluster above (ImageNet's train split: a "
                        "self-kNN of 1.28M x 1.28M x 2048 is 6.7 PFLOP)")
    p.add_argument("--mislabel-show", type=int, default=48, help="suspected mislabels drawn in mislabels.png")
    p.add_argument("--kmeans-redo", type=int, default=5, help="k-means restarts (the best objective is kept)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-pixel kNN and k-means")
    p.add_argument("--raw-size", type=int, help="side of the raw-pixel baseline (default: the features' own "
                   "resolution, at most 32 px for folders: 3,072 values an RGB image)")
    # run
    p.add_argument("--out-dir", help="default: <checkpoint or backbone folder>/eval")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--feature-batch-size", type=int, default=256,
                   help="images per batch of the feature extraction, per process (train.py's flag of the same name)")
    p.add_argument("--workers", type=int, default=utils.default_workers(),
                   help="data-loading processes per process (default: this machine's cores over its processes, at "
                        "most 10: decoding is what extraction waits on)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="precision of the extraction on CUDA: none = fp32 (MoCo v3's evaluation); the stored "
                        "features are float16 either way, and kNN, probe and k-means compute in fp32")
    p.add_argument("--seed", type=int, default=0, help="subsets, batches, k-means and probe")
    p.add_argument("--dist-timeout", type=float, default=30.0, help="minutes to wait for the other processes")
    args = p.parse_args(argv)
    try:
        args.knn_k = sorted({int(k) for k in args.knn_k.split(",") if k.strip()})
    except ValueError:
        p.error(f"--knn-k {args.knn_k!r}: expected comma-separated integers such as 10,20,100,200")
    if not args.knn_k or min(args.knn_k) < 1:
        p.error("--knn-k needs positive integers")
    if args.feature_batch_size < 2:
        p.error(f"--feature-batch-size {args.feature_batch_size}: at least 2 (the momentum embedding normalises with batch statistics)")
    utils.check_flags(p, args, positive=("knn_t", "probe_lr", "feature_batch_size", "probe_batch_size", "grid_cols",
                                         "kmeans_redo", "raw_size", "img_size", "dist_timeout"),
                      non_negative=("train_subset", "test_subset", "probe_epochs", "grid_clusters", "mislabel_show",
                                    "workers"))
    return args


# ----------------------------------------------------------------------------- features
@dataclass
class Split:
    """Everything evaluate.py keeps of one split, one row per image in the data set's order:
    backbone features in half precision (kNN, probe, k-means take them a block at a time
    and in fp32), the momentum embedding the mixture was fit on (fp16, or None), raw pixels
    in uint8 (or None) and the labels. ImageNet's train split: 1.28M x 2048 x 2 bytes =
    5.2 GB of features, 0.66 GB of embeddings, 3.9 GB of 32 px pixels."""
    feats: torch.Tensor
    emb: torch.Tensor
    raw: torch.Tensor
    labels: torch.Tensor

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.feats, self.emb, self.raw, self.labels) if t is not None)


def raw_side(args):
    """The raw-pixel baseline's side: the features' own resolution, at most the data set's
    cap (ImageNet at 224 px would be 150,528 values an image)."""
    return args.raw_size or min(args.img_size, data.SPECS[args.data].raw_size)


@torch.no_grad()
def extract(ds, backbone, embed, args, desc="features", dims=None):
    """Decode every image once (eval view) and keep what each measurement needs (Split):
    backbone(x), the pooled ResNet features of kNN and the probe; embed(x), the momentum
    embedding the mixture was fit on (SiamMM.embed, None for an exported backbone); the raw
    pixels, the same view resized to raw_side() (no second decode). Modules are in eval
    mode: nothing is updated (embed may normalise with batch statistics, as training did).
    Under torchrun each rank embeds its share and rank 0 receives the whole split (the
    other ranks get None); dims: the feature and embedding widths, so that a rank with no
    batch (more ranks than batches) still sends rows of the right shape."""
    backbone.eval()
    loader = data.feature_loader(ds, args.feature_batch_size, args)
    side = None if args.no_raw else raw_side(args)
    rows = {"feats": [], "emb": [], "raw": [], "labels": [], "index": []}
    for x, y, idx in tqdm(loader, desc=desc, leave=False, disable=not args.master):
        x = x.to(args.device, non_blocking=True)
        xin = data.to_input(x, args.data, args.device)
        with autocast(args.device, args.amp):
            rows["feats"].append(backbone(xin).float().clamp(-65504, 65504).half().cpu())   # fp16's range
            if embed is not None:
                rows["emb"].append(embed(xin).half().cpu())
        if side is not None:
            r = x if x.shape[-1] == side else F.interpolate(x.float(), size=(side, side), mode="bilinear",
                                                            antialias=True).round().clamp(0, 255).to(torch.uint8)
            rows["raw"].append(r.flatten(1).cpu())
        rows["labels"].append(torch.as_tensor(y).long())
        rows["index"].append(idx)
    index = torch.cat(rows["index"]) if rows["index"] else torch.zeros(0, dtype=torch.long)
    feat_dim, emb_dim = dims or (0, 0)
    empty = {"feats": torch.zeros(0, feat_dim, dtype=torch.half), "emb": torch.zeros(0, emb_dim, dtype=torch.half),
             "raw": torch.zeros(0, data.SPECS[args.data].channels * (side or 0) ** 2, dtype=torch.uint8),
             "labels": torch.zeros(0, dtype=torch.long)}
    out = {}
    for key in ("feats", "emb", "raw", "labels"):
        if (key == "emb" and embed is None) or (key == "raw" and side is None):
            out[key] = None
            continue
        local = torch.cat(rows[key]) if rows[key] else empty[key]
        out[key] = utils.gather_rows(local, index, len(ds), dst=0)
    return Split(**out) if args.master else None


# ----------------------------------------------------------------------------- cost, before anything runs
def plan(n_train, n_test, feat_dim, emb_dim, num_classes, args, has_mixture=None):
    """The costs of the stages asked for, checked before the first image is decoded; returns
    the mislabel vote to use (--mislabel-votes auto settled by the report split's size).
    has_mixture: the checkpoint holds a mixture (default: it has an embedding); without one
    the report clusters its split with k-means."""
    side = raw_side(args)
    raw_dim = data.SPECS[args.data].channels * side * side
    row = 2 * feat_dim + 2 * emb_dim + (0 if args.no_raw else raw_dim) + 8
    utils.check_memory((n_train + n_test) * row, f"keeping {n_train + n_test:,} images' features",
                       "use --train-subset" + ("" if args.no_raw else ", or --no-raw"))
    n_report = n_train if args.report_split == "train" else n_test
    votes = args.mislabel_votes
    if votes == "auto":
        votes = "knn" if n_report <= SELF_KNN_MAX else "cluster"
    n_metrics = n_train if args.metrics_split == "train" else n_test
    kmeans = 2 * 50 * args.kmeans_redo * num_classes   # FLOP per image and dimension: 50 Lloyd iterations a restart
    utils.check_cost(f"kNN of {n_test:,} images among {n_train:,}", 2 * n_test * n_train * feat_dim,
                     "use --train-subset or --test-subset", args.device)
    if votes == "knn":
        utils.check_cost(f"the kNN mislabel vote over {n_report:,} {args.report_split} images",
                         2 * n_report * n_report * feat_dim, "use --mislabel-votes cluster or --report-split test",
                         args.device)
    utils.check_cost(f"k-means (K = {num_classes}) on {n_metrics:,} features", kmeans * n_metrics * feat_dim,
                     "lower --kmeans-redo, or use --test-subset", args.device)
    has_mixture = emb_dim > 0 if has_mixture is None else has_mixture
    if not has_mixture and args.report_split != args.metrics_split:   # the same split: clusters() did it
        utils.check_cost(f"k-means (K = {num_classes}) on the {n_report:,} {args.report_split} images of the report",
                         kmeans * n_report * feat_dim, "use --report-split test, or lower --kmeans-redo", args.device)
    if not args.no_raw:
        utils.check_cost(f"raw-pixel kNN of {n_test:,} images among {n_train:,}", 2 * n_test * n_train * raw_dim,
                         "add --no-raw, or lower --raw-size", args.device)
        utils.check_cost(f"raw-pixel k-means (K = {num_classes}) on {n_metrics:,} images",
                         kmeans * n_metrics * raw_dim, "add --no-raw", args.device)
    return votes


# ----------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, ks=(20,), T=0.07, num_classes=None,
                 topn=5, chunk_elems=2 ** 26, device=torch.device("cpu")):
    """Weighted kNN, the protocol of DINO's eval_knn.py (Wu et al. 2018's instance
    discrimination before it): features are L2-normalised, each test image takes its k
    most cosine-similar training images, and each neighbour votes exp(cos / T) for its
    class; the class with the most votes wins.

    Several k at once: the max(ks) nearest neighbours are found once (an exact search that
    takes the training features a block at a time, search.torch_search) and every smaller
    k uses a prefix of them; search.knn_votes counts the votes. Returns {k: (N_test x
    min(topn, C)) class predictions, best first}."""
    labels = torch.as_tensor(train_labels).long()
    C = num_classes or int(labels.max()) + 1
    kmax = min(max(ks), len(labels))
    sims, idx = torch_search(test_feats, train_feats, kmax, device, budget=chunk_elems, normalize=True, desc="kNN")
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    out = {}
    for k in ks:
        kk = min(k, kmax)
        out[k] = knn_votes(sims[:, :kk], labels[idx[:, :kk]], T, C).topk(min(topn, C), dim=1).indices
    return out


def topk_accuracy(preds, labels, k=1):
    """Fraction of rows whose true label is among the first k predictions."""
    labels = torch.as_tensor(labels).long()
    return (preds[:, :k] == labels[:, None]).any(1).float().mean().item()


# ----------------------------------------------------------------------------- the quick linear probe
def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=100, lr=0.1, batch_size=1024,
                 seed=0, device=torch.device("cpu")):
    """The quick check: a linear classifier on cached frozen features of the centre views,
    with MoCo v3's main_lincls optimiser (fc weights N(0, 0.01), zero bias, SGD momentum
    0.9, no weight decay, lr = base x batch / 256, cosine, here per iteration), cross-
    entropy; the last epoch is reported (not the best: no peeking at the test split). It
    is not the paper's linear protocol: no RandomResizedCrop views, standardised
    features, 100 epochs in seconds. Table 1's number comes from lincls.py.

    The features are standardised with the train split's mean and std (MAE's linear probe
    does the same with a BatchNorm without affine): with no weight decay a per-dimension
    affine map changes which classifier SGD reaches in a few epochs, not which classifiers
    exist, and one base lr then fits every backbone. The features may be half precision;
    each batch is standardised in fp32 as it is taken (no fp32 copy of the split).
    Returns {"top1", "top5", "train_top1"} and the trained nn.Linear."""
    g = torch.Generator().manual_seed(seed)
    n = train_x.shape[0]
    blocks = [slice(s, s + 65536) for s in range(0, n, 65536)]
    s1 = sum(train_x[b].double().sum(0) for b in blocks)               # mean and std a block at a time
    s2 = sum(train_x[b].double().square().sum(0) for b in blocks)
    mean = (s1 / n).float().to(device)
    std = ((s2 - s1 ** 2 / n) / max(n - 1, 1)).clamp_min(0).sqrt().float().clamp_min(1e-6).to(device)

    def standardised(x, rows):
        return (x[rows].to(device).float() - mean) / std

    ytr, yte = torch.as_tensor(train_y).long().to(device), torch.as_tensor(test_y).long()
    fc = nn.Linear(train_x.shape[1], num_classes).to(device)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 0.01)   # seeded N(0, 0.01)
        fc.bias.zero_()
    base_lr = lr * batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
    total, step = epochs * math.ceil(n / batch_size), 0
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = utils.cosine_schedule(step, total, base_lr)
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(fc(standardised(train_x, b)), ytr[b.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        test_pred = torch.cat([fc(standardised(test_x, b)).topk(min(5, num_classes), dim=1).indices.cpu()
                               for b in [slice(s, s + 65536) for s in range(0, len(test_x), 65536)]])
        train_pred = torch.cat([fc(standardised(train_x, b)).argmax(1).cpu() for b in blocks])
    return {"top1": topk_accuracy(test_pred, yte, 1), "top5": topk_accuracy(test_pred, yte, 5),
            "train_top1": (train_pred == ytr.cpu()).float().mean().item()}, fc


# ----------------------------------------------------------------------------- cluster metrics (Table 3)
def majority_accuracy(labels, clusters):
    """Table 3's accuracy: every cluster is named after its most common true label; the
    fraction of images whose label is their cluster's name (cluster purity)."""
    c = skm.cluster.contingency_matrix(labels, clusters)      # classes x clusters
    return float(c.max(axis=0).sum() / c.sum())


def hungarian_accuracy(labels, clusters):
    """Clustering accuracy of DEC and its successors: the one-to-one map of clusters to
    classes that matches the most images (Hungarian algorithm, scipy), then the fraction
    matched. With more clusters than classes the unmatched clusters count as errors."""
    c = skm.cluster.contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / c.sum())


def cluster_metrics(labels, clusters):
    """Table 3: AMI, NMI, ARI (scikit-learn) and majority-label accuracy of a clustering,
    plus the number of non-empty clusters and the Hungarian accuracy."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    return {"K": int(len(np.unique(clusters))),
            "ami": float(skm.adjusted_mutual_info_score(labels, clusters)),
            "nmi": float(skm.normalized_mutual_info_score(labels, clusters)),
            "ari": float(skm.adjusted_rand_score(labels, clusters)),
            "majority_acc": majority_accuracy(labels, clusters),
            "hungarian_acc": hungarian_accuracy(labels, clusters)}


def spherical_kmeans(feats, k, seed=0, niter=50, nredo=5, device=None):
    """k-means on the unit sphere (cosine, the geometry the model is trained in; Euclidean
    k-means on unnormalised features would weigh each image by its norm): the training's own
    k-means (cluster.VMFMixture, whose searches run on this process's GPU with or without
    faiss-gpu) on all points, from a random init, the best objective of nredo seeded
    restarts (its re-initialising mode, PCL's). Returns (assignments, K x D centroids)."""
    x = torch.nn.functional.normalize(torch.as_tensor(feats).float(), dim=1)
    n = len(x)
    km = VMFMixture(x.shape[1], k, kappa_estimator="const", init_iters=niter, reinit_centroids=True, nredo=nredo, seed=seed,
                    device=device).fit(x, torch.arange(n), n)
    _, ids = nearest_centroid(x.numpy(), km.centroids.numpy(), device)
    return ids.astype(np.int64), km.centroids


def pixel_kmeans(pixels, k, seed=0, n_init=10):
    """The raw-pixel floor as the clustering literature reports it (DEC and its successors):
    scikit-learn's (Euclidean) KMeans on pixels in [0, 1], n_init = 10, seeded."""
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(pixels, dtype=np.float32))


def assign_clusters(z, centroids, device=None):
    """Each embedding's nearest centroid by cosine (the hard E-step of eq. 8), with two
    confidences: the cosine to that centroid and its margin over the second nearest.
    Returns (cluster ids, cosine, margin) as numpy arrays."""
    k = min(2, centroids.shape[0])
    sims, ids = torch_search(z, F.normalize(torch.as_tensor(centroids).float(), dim=1), k, device or "cpu",
                             normalize=True)
    margin = sims[:, 0] - sims[:, 1] if k == 2 else sims[:, 0].copy()
    return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32), margin.astype(np.float32)


# ----------------------------------------------------------------------------- main
def representation(train, test, num_classes, args, times):
    """Weighted kNN (DINO) and the quick linear probe on cached features, train -> test."""
    t0 = time.time()
    preds = knn_classify(train.feats, train.labels, test.feats, args.knn_k, args.knn_t, num_classes, device=args.device)
    knn = {"T": args.knn_t, "top1": {str(k): topk_accuracy(p, test.labels, 1) for k, p in preds.items()},
           "top5": {str(k): topk_accuracy(p, test.labels, 5) for k, p in preds.items()}}
    times["knn"] = time.time() - t0
    probe = None
    if args.probe_epochs:
        t0 = time.time()
        probe, _ = linear_probe(train.feats, train.labels, test.feats, test.labels, num_classes, args.probe_epochs,
                                args.probe_lr, args.probe_batch_size, args.seed, args.device)
        probe |= {"epochs": args.probe_epochs, "lr": args.probe_lr, "batch_size": args.probe_batch_size,
                  "protocol": "quick check: cached centre-view features, standardised (Table 1: lincls.py)"}
        times["linear_probe"] = time.time() - t0
    return knn, probe


def clustering(split, mixture, num_classes, args):
    """Table 3 on --metrics-split: spherical k-means with K = number of classes on the
    backbone features (Hungarian accuracy), and the learned clusters: each image's momentum
    embedding to its nearest centroid of the checkpoint's mixture. Also returns what the
    cluster report reuses when it looks at the same split: the learned assignment (ids,
    cosine, margin; None without a mixture) and the k-means centroids."""
    km_ids, km_cents = spherical_kmeans(split.feats, num_classes, args.seed, nredo=args.kmeans_redo, device=args.device)
    kmeans = {"split": args.metrics_split, "method": "spherical k-means on L2-normalised backbone features",
              "redo": args.kmeans_redo} | cluster_metrics(split.labels.numpy(), km_ids)
    learned = assignment = None
    if mixture is not None:
        assignment = assign_clusters(split.emb, mixture.centroids, args.device)
        learned = {"split": args.metrics_split, "K_mixture": int(mixture.centroids.shape[0])} \
            | cluster_metrics(split.labels.numpy(), assignment[0])
        if learned["K_mixture"] != num_classes:   # Hungarian accuracy only when K = number of classes
            learned["hungarian_acc"] = None
    return kmeans, learned, assignment, km_cents


def raw_baselines(train, test, metric, num_classes, args):
    """The floor, measured like the features: kNN and spherical k-means on the raw pixels
    of the same views (at the features' resolution); and scikit-learn's Euclidean k-means on
    pixels in [0, 1], the clustering literature's floor, where it takes under 10 minutes."""
    preds = knn_classify(train.raw, train.labels, test.raw, args.knn_k, args.knn_t, num_classes, device=args.device)
    ids, _ = spherical_kmeans(metric.raw, num_classes, args.seed, nredo=args.kmeans_redo, device=args.device)
    out = {"side": raw_side(args), "knn_top1": {str(k): topk_accuracy(p, test.labels, 1) for k, p in preds.items()},
           "kmeans": {"split": args.metrics_split, "method": "spherical k-means on L2-normalised pixels"}
           | cluster_metrics(metric.labels.numpy(), ids)}
    n, dim = metric.raw.shape
    if utils.seconds(2 * 10 * 100 * n * num_classes * dim, torch.device("cpu")) < 600:   # n_init 10, <= 100 iterations
        ids = pixel_kmeans(metric.raw.float().div(255).numpy(), num_classes, args.seed)
        out["kmeans_euclidean"] = {"split": args.metrics_split, "method": "scikit-learn KMeans on pixels in "
                                   "[0, 1], n_init 10"} | cluster_metrics(metric.labels.numpy(), ids)
    return out


def evaluate(args):
    t_start, times = time.time(), {}
    utils.setup_distributed(args, args.dist_timeout)
    if args.export_backbone:
        if not args.checkpoint:
            raise UserError("--export-backbone writes a train.py --checkpoint's backbone; --backbone already is one")
        model, _, _ = load_checkpoint(args)
        run_safety.atomic_save(model.export_backbone(args.encoder), args.export_backbone)
        print(f"{args.encoder} backbone of {args.checkpoint} ({args.arch}) -> {args.export_backbone}: "
              f"evaluate.py or lincls.py --backbone {args.export_backbone} --arch {args.arch}")
        return None
    backbone, feat_dim, embed, mixture, train_args = load_pretrained(args, args.device)
    if args.device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    source_path = args.checkpoint or args.backbone
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(source_path)), "eval")
    digest = utils.state_digest(backbone)     # MoCo v3's sanity check, compared at the end

    # ---- data: the full train split -> the full val split unless subsets are asked for
    tf = data.eval_transform(args.data, args.img_size)
    train_set = data.subset(data.load_dataset(args.data, args.data_dir, "train", tf, args.download),
                            args.train_subset, args.seed)
    test_set = data.subset(data.load_dataset(args.data, args.data_dir, "val", tf, args.download), args.test_subset, args.seed)
    data.check_same_classes(train_set, test_set)
    classes = getattr(train_set, "classes", None)
    num_classes = len(classes) if classes else int(max(torch.as_tensor(train_set.targets).max(),
                                                           torch.as_tensor(test_set.targets).max())) + 1
    if min(len(train_set), len(test_set)) < 2:
        raise UserError(f"the splits hold {len(train_set)} train and {len(test_set)} val images: both need at least 2")
    if max(args.knn_k) > len(train_set) - 1:
        raise UserError(f"--knn-k {max(args.knn_k)} needs more than the {len(train_set)} train images: use a smaller k")
    emb_dim = train_args.get("dim", 0) if embed is not None else 0
    args.mislabel_votes = plan(len(train_set), len(test_set), feat_dim, emb_dim, num_classes, args,
                               has_mixture=mixture is not None)
    if args.master:
        os.makedirs(os.path.join(out_dir, "clusters"), exist_ok=True)   # only once the data loads
        print(f"evaluating {source_path} | {args.arch} on {args.data} | train {len(train_set)} -> test "
              f"{len(test_set)} | {args.world_size} x {args.device}")

    # ---- decode every image once: features, momentum embeddings, raw pixels (sharded under torchrun)
    t0 = time.time()
    train = extract(train_set, backbone, embed, args, "features train", (feat_dim, emb_dim))
    test = extract(test_set, backbone, embed, args, "features test", (feat_dim, emb_dim))
    times["features"] = time.time() - t0
    if args.distributed:   # the other ranks' part ends with the features; rank 0 goes on alone
        dist.destroy_process_group()
    if not args.master:
        return None

    knn, probe = representation(train, test, num_classes, args, times)
    metric = train if args.metrics_split == "train" else test
    t0 = time.time()
    kmeans, learned, metric_assignment, metric_cents = clustering(metric, mixture, num_classes, args)
    times["clusters"] = time.time() - t0
    raw = None
    if not args.no_raw:
        t0 = time.time()
        raw = raw_baselines(train, test, metric, num_classes, args)
        times["raw_pixels"] = time.time() - t0

    # ---- the cluster report (Fig. 2, Fig. 3, sec. 6.8): the checkpoint's mixture, else k-means
    t0 = time.time()
    rep_split, rds = (train, train_set) if args.report_split == "train" else (test, test_set)
    same = rep_split is metric   # then clustering() has assigned (or k-means-clustered) this split already
    if mixture is not None:
        assignment = metric_assignment if same else assign_clusters(rep_split.emb, mixture.centroids, args.device)
        source = "the checkpoint's mixture (momentum embeddings -> nearest centroid)"
    else:   # an exported backbone has no mixture: spherical k-means, K = classes, on its features
        cents = metric_cents if same else spherical_kmeans(rep_split.feats, num_classes, args.seed,
                                                           nredo=args.kmeans_redo, device=args.device)[1]
        assignment = assign_clusters(rep_split.feats, cents, args.device)
        source = f"spherical k-means (K = {num_classes}) on backbone features"
    run_dir = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else None
    rep = report.cluster_report(out_dir, rds, rep_split.feats, rep_split.labels.numpy(), classes, assignment, args,
                                args.device, report.read_k_history(run_dir, mixture), train_args.get("num_clusters"))
    rep["cluster_source"] = source
    times["report"] = time.time() - t0

    # ---- MoCo v3's sanity check: the evaluated backbone is bit-identical to the loaded one
    changed = utils.changed_keys(backbone, digest)
    if changed:
        raise RuntimeError(f"the frozen backbone changed during evaluation ({len(changed)} tensors, e.g. {changed[0]})")

    times["total"] = time.time() - t_start
    res = {"source": {"checkpoint": args.checkpoint, "backbone": args.backbone, "epoch": train_args.get("epoch"),
                      "arch": args.arch, "small_stem": args.small_stem, "width": args.width, "data": args.data,
                      "img_size": args.img_size, "encoder": args.encoder,
                      "train_subset_of_pretraining": train_args.get("subset")},
           "split": {"train": len(train_set), "test": len(test_set), "train_subset": args.train_subset,
                     "test_subset": args.test_subset, "seed": args.seed, "num_classes": num_classes,
                     "note": f"kNN / probe: train -> test; cluster metrics on {args.metrics_split}; "
                             f"report on {args.report_split}"},
           "device": f"{args.world_size} x {args.device}", "feature_store": {"dtype": "float16",
                                                                      "bytes": train.nbytes() + test.nbytes()},
           "knn": knn, "linear_probe": probe, "learned_clusters": learned, "kmeans": kmeans, "raw_pixels": raw,
           "report": rep, "backbone_unchanged": not changed, "time_s": {k: round(v, 2) for k, v in times.items()},
           "results_path": os.path.join(out_dir, "results.json")}
    with open(res["results_path"], "w") as f:
        json.dump(res, f, indent=1)
    print(report.summary_table(res))
    return res


def main(argv=None):
    return utils.guard("evaluate.py", evaluate, get_args(argv))


if __name__ == "__main__":
    main()
