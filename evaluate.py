"""
Evaluation of SiamMM (arXiv 2511.05462): what the paper measures, on Fashion-MNIST or any
ImageFolder data set, on a CPU or a GPU, in one run.

    representation  weighted kNN on frozen backbone features (DINO protocol) and a quick
                    linear probe on cached frozen features, train split -> test split;
                    optional semi-supervised fine-tuning on 1% / 10% of the labels (Table 2)
    clusters        AMI, NMI, ARI and majority-label accuracy of the learned clusters
                    (Table 3); Hungarian accuracy of k-means with K = number of classes
    floor           the same kNN and k-means on raw pixels, on the same split
    cluster report  K per epoch (Fig. 2), image grids per cluster (Fig. 3), suspected
                    mislabels (sec. 6.8): report.py

A checkpoint of train.py carries everything (data, architecture, image size, the mixture):
    $ python evaluate.py --checkpoint runs/siammm/checkpoint.pth
A quick look on subsets (the default is the full train split -> the full test split):
    $ python evaluate.py --checkpoint runs/siammm/checkpoint.pth --train-subset 10000 --test-subset 2000
Semi-supervised fine-tuning (slow on a CPU, so off by default):
    $ python evaluate.py --checkpoint runs/siammm/checkpoint.pth --semi 1,10
An exported backbone (SiamMM.export_backbone) on ImageNet, with SimCLR's label split files:
    $ python evaluate.py --backbone r50.pth --arch resnet50 --data imagenet --data-dir /datasets/imagenet \
        --img-size 224 --semi 1,10 --semi-split-file 1percent.txt --semi-split-file 10percent.txt

Everything goes to OUT_DIR (default: <folder of the checkpoint>/eval): results.json,
k_per_epoch.png, clusters/cluster_*.png, mislabels.csv, mislabels.png; a summary table
goes to stdout. The file reads top to bottom: config, loading, features, kNN, linear
probe, fine-tuning, cluster metrics, main.
"""

import argparse
import copy
import json
import math
import os
import time

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.cluster import KMeans
from tqdm import tqdm

import data
import report
import utils
from cluster import VMFMixture, flat_ip_index, knn_search
from model import SiamMM, build_backbone, model_args
from utils import UserError, autocast


# ----------------------------------------------------------------------------- config
def get_args(argv=None):
    p = utils.ArgumentParser(prog="evaluate.py", description="Evaluate a SiamMM checkpoint or backbone",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py checkpoint (model, mixture and the training flags)")
    src.add_argument("--backbone", help="an exported backbone state_dict (SiamMM.export_backbone); "
                     "give --arch, --data, --img-size (small stem and channels are read from its conv1)")
    # data and model: unset flags are read from the checkpoint's training flags
    p.add_argument("--data", choices=data.NAMES, help="default: the checkpoint's, else fashion-mnist")
    p.add_argument("--data-dir", help="default: the checkpoint's (fashion-mnist: the Debian package's idx files)")
    p.add_argument("--download", action="store_true", help="fashion-mnist: download with torchvision if missing (needs internet)")
    p.add_argument("--img-size", type=int, help="evaluation image size; default: the training size (16 for "
                   "fashion-mnist with --backbone, the cpu preset of train.py; 224 for folders)")
    p.add_argument("--arch", help="--backbone only: torchvision ResNet name (default resnet18)")
    p.add_argument("--train-subset", type=int, default=0, help="seeded random subset of the train split (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="seeded random subset of the test split (0 = all)")
    p.add_argument("--encoder", default="online", choices=["online", "momentum"],
                   help="backbone for kNN / probe / fine-tuning: the online f (what export_backbone saves, "
                   "MoCo v3's choice) or the momentum f_m")
    # kNN (DINO eval_knn.py)
    p.add_argument("--knn-k", default="20", help="neighbours, comma-separated (DINO also reports 10,20,100,200)")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the votes exp(cos / T)")
    # linear probe (MoCo v3 main_lincls.py)
    p.add_argument("--probe-epochs", type=int, default=100, help="epochs on cached features (0 = no probe)")
    p.add_argument("--probe-lr", type=float, default=0.1, help="base lr; actual lr = base x batch / 256")
    p.add_argument("--probe-batch-size", type=int, default=1024, help="MoCo v3 main_lincls default")
    # semi-supervised fine-tuning (Table 2, SimCLR protocol)
    p.add_argument("--semi", default="", help="label percentages, e.g. 1,10 (empty = skip; slow on a CPU)")
    p.add_argument("--semi-split-file", action="append", default=[],
                   help="SimCLR split file (one image file name a line), one per --semi percentage, in order")
    p.add_argument("--semi-epochs", type=int, default=0, help="0 = SimCLR's: 60 for <= 1%%, 30 above")
    p.add_argument("--semi-lr", type=float, default=0.05, help="base lr (SimCLR: 0.05 x batch / 256)")
    p.add_argument("--semi-batch-size", type=int, default=256)
    p.add_argument("--semi-crop-min", type=float, help="smallest crop scale; default: the checkpoint's "
                   "--crop-min, else 0.08 (SimCLR)")
    # clusters and the report
    p.add_argument("--metrics-split", default="test", choices=["train", "test"], help="split of the Table 3 metrics")
    p.add_argument("--report-split", default="train", choices=["train", "test"], help="split of the grids and mislabels")
    p.add_argument("--grid-clusters", type=int, default=10, help="image grids for the largest N clusters")
    p.add_argument("--grid-cols", type=int, default=12, help="images per row (per true class) in a cluster grid")
    p.add_argument("--confidence", default="cosine", choices=["cosine", "margin"],
                   help="confidence of an assignment: cosine to its centroid, or its margin over the second nearest")
    p.add_argument("--mislabel-votes", default="knn", choices=["knn", "cluster"],
                   help="who votes on each label of the report: the smallest --knn-k nearest other images (weighted, "
                        "leave-one-out) or the image's learned cluster (sec. 6.8; coarse once K nears the class count)")
    p.add_argument("--mislabel-show", type=int, default=48, help="suspected mislabels drawn in mislabels.png")
    p.add_argument("--kmeans-redo", type=int, default=5, help="k-means restarts (the best objective is kept)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-pixel kNN and k-means")
    p.add_argument("--raw-size", type=int, help="side of the raw-pixel baseline's centre crop (default: the data "
                   "set's, 28 for fashion-mnist, 32 for folders)")
    # run
    p.add_argument("--out-dir", help="default: <checkpoint or backbone folder>/eval")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--seed", type=int, default=0, help="subsets, k-means, probe and fine-tuning")
    args = p.parse_args(argv)
    try:
        args.knn_k = sorted({int(k) for k in args.knn_k.split(",") if k.strip()})
    except ValueError:
        p.error(f"--knn-k {args.knn_k!r}: expected comma-separated integers such as 10,20,100,200")
    try:
        args.semi = [float(s) for s in args.semi.split(",") if s.strip()]
    except ValueError:
        p.error(f"--semi {args.semi!r}: expected comma-separated percentages such as 1,10")
    if not args.knn_k or min(args.knn_k) < 1:
        p.error("--knn-k needs positive integers")
    if any(not 0 < s <= 100 for s in args.semi):
        p.error("--semi percentages must lie in (0, 100]")
    if args.semi_split_file and len(args.semi_split_file) != len(args.semi):
        p.error(f"{len(args.semi_split_file)} --semi-split-file for {len(args.semi)} --semi percentages: give one per percentage")
    for flag in ("train_subset", "test_subset", "probe_epochs", "semi_epochs", "grid_clusters", "mislabel_show"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("batch_size", "probe_batch_size", "semi_batch_size", "grid_cols", "kmeans_redo", "raw_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


# ----------------------------------------------------------------------------- loading
def load_checkpoint(args):
    """A train.py checkpoint -> (SiamMM in eval mode, VMFMixture or None, training flags).

    The model settings (arch, stem, head widths, D) always come from the checkpoint; the
    data settings come from it unless a flag overrides them (the data may have moved)."""
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file (train.py writes OUT_DIR/checkpoint.pth)")
    ckpt = utils.load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'model' and 'args'); "
                        "for an exported backbone use --backbone")
    targs = ckpt["args"]
    args.data = args.data or targs["data"]
    args.data_dir = targs.get("data_dir", "") if args.data_dir is None else args.data_dir
    args.img_size = args.img_size or targs["img_size"]
    if args.arch and args.arch != targs["arch"]:
        raise UserError(f"--arch {args.arch} differs from the checkpoint's {targs['arch']}: drop --arch")
    args.arch, args.small_stem = targs["arch"], targs["small_stem"]
    in_chans = data.SPECS[targs["data"]].channels
    if data.SPECS[args.data].channels != in_chans:
        raise UserError(f"the checkpoint was trained on {targs['data']} ({in_chans} channels); "
                        f"--data {args.data} has {data.SPECS[args.data].channels}")
    shape = model_args(targs)
    args.width = shape["width"]
    model = SiamMM(in_chans=in_chans, **shape)
    # Evaluation uses f, f_m and g_m only (the predictor h serves training alone), so only
    # their tensors must match: a change to the predictor does not lock old checkpoints out.
    used = ("backbone.", "momentum_backbone.", "momentum_projector.")
    sd = {k: v for k, v in ckpt["model"].items() if k.startswith(used)}
    try:
        missing, _ = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:   # shapes differ
        raise UserError(f"{path} does not fit the model its flags describe: "
                        + next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])) from None
    missing = [k for k in missing if k.startswith(used)]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} tensors of the backbone / momentum encoder (e.g. {missing[0]})")
    mixture = None
    if ckpt.get("mixture") is not None:
        mixture = VMFMixture(targs["dim"], ckpt["mixture"]["centroids"].shape[0])
        mixture.load_state_dict(ckpt["mixture"])
    return model.eval(), mixture, targs | {"epoch": ckpt.get("epoch")}


def load_backbone(args):
    """An exported backbone state_dict -> (ResNet without fc, in eval mode, feature dim).

    The stem, the width and the input channels are read off conv1's weight (3 x 3 = small
    stem; its first dimension = width, its second = channels), so only --arch must be right;
    a wrong one fails to load."""
    path = args.backbone
    if not os.path.isfile(path):
        raise UserError(f"--backbone {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read backbone {path}: {e}") from None
    if not isinstance(sd, dict) or "conv1.weight" not in sd:
        hint = " (a train.py checkpoint: use --checkpoint)" if isinstance(sd, dict) and "model" in sd else ""
        raise UserError(f"{path} is not a ResNet backbone state_dict (no conv1.weight){hint}")
    args.data = args.data or "fashion-mnist"
    args.data_dir = args.data_dir or ""
    args.img_size = args.img_size or data.SPECS[args.data].img_size
    args.arch = args.arch or "resnet18"
    args.small_stem = sd["conv1.weight"].shape[-1] == 3
    args.width, in_chans = sd["conv1.weight"].shape[:2]
    if in_chans != data.SPECS[args.data].channels:
        raise UserError(f"the backbone takes {in_chans}-channel images; --data {args.data} has {data.SPECS[args.data].channels}")
    try:
        net, dim = build_backbone(args.arch, args.small_stem, in_chans, args.width)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:   # every key must match (fc is an Identity, so the exported backbone has no fc.*)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        problem = (f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else
                   f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else None)
    except RuntimeError as e:   # shapes differ
        problem = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
    if problem:
        raise UserError(f"the weights in {path} do not fit --arch {args.arch}: {problem}")
    return net.eval(), dim


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(loader, name, backbone, embed=None, device=torch.device("cpu"), desc="features"):
    """Frozen features of every image of a loader (eval transform, no augmentation), in the
    data set's order whatever order the loader's batches come in (loader_for's are random).

    backbone(x): the pooled ResNet features (512-d resnet18, 2048-d resnet50) that kNN and
    the linear probe use. embed(x), optional: SiamMM.embed, the normalised momentum
    embedding the mixture was fit on (sec. 5.1), used to assign images to clusters.
    Modules are in eval mode, so the backbone's BN uses its running statistics and nothing
    is updated (embed may normalise with batch statistics, as training did; it updates
    nothing either).
    Returns (features, embeddings or None, labels), on the CPU."""
    backbone.eval()
    n = len(loader.dataset)
    feats = embs = None
    labels = torch.zeros(n, dtype=torch.long)
    for x, y, idx in tqdm(loader, desc=desc, leave=False):
        x = data.to_input(x, name, device)
        with autocast(device):
            f = backbone(x).float().cpu()
            z = embed(x).float().cpu() if embed is not None else None
        if feats is None:
            feats = torch.zeros(n, f.shape[1])
            embs = torch.zeros(n, z.shape[1]) if z is not None else None
        feats[idx] = f
        if z is not None:
            embs[idx] = z
        labels[idx] = torch.as_tensor(y).long()
    return feats, embs, labels


@torch.no_grad()
def raw_pixels(loader, desc="raw pixels"):
    """Every image's pixels as one flat row, in the data set's order."""
    rows = None
    for x, _, idx in tqdm(loader, desc=desc, leave=False):
        if rows is None:
            rows = torch.zeros(len(loader.dataset), x[0].numel())
        rows[idx] = x.flatten(1).float().div(255)   # uint8 -> [0, 1], as ToTensor
    return rows


# ----------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, ks=(20,), T=0.07, num_classes=None,
                 topn=5, chunk_elems=2 ** 26, device=torch.device("cpu")):
    """Weighted kNN, the protocol of DINO's eval_knn.py (Wu et al. 2018's instance
    discrimination before it): features are L2-normalised, each test image takes its k
    most cosine-similar training images, and each neighbour votes exp(cos / T) for its
    class; the class with the most votes wins.

    Several k at once: the max(ks) nearest neighbours are found once (sorted by similarity)
    and every smaller k uses a prefix of them. Test images go in chunks so that the
    chunk x N_train similarity matrix stays below chunk_elems floats (256 MB by default),
    whatever the size of the test set.
    Returns {k: (N_test x min(topn, C)) class predictions, best first}."""
    train = F.normalize(train_feats.float(), dim=1).to(device)
    test = F.normalize(test_feats.float(), dim=1).to(device)
    labels = torch.as_tensor(train_labels).long().to(device)
    C = num_classes or int(labels.max()) + 1
    kmax = min(max(ks), train.shape[0])
    chunk = max(1, chunk_elems // max(train.shape[0], 1))
    out = {k: [] for k in ks}
    for s in tqdm(range(0, test.shape[0], chunk), desc="kNN", leave=False):
        sims, idx = (test[s:s + chunk] @ train.T).topk(kmax, dim=1)     # sorted, most similar first
        votes_w = (sims / T).exp()
        nbr_labels = labels[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(sims.shape[0], C, device=device).scatter_add_(1, nbr_labels[:, :kk], votes_w[:, :kk])
            out[k].append(votes.topk(min(topn, C), dim=1).indices.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(preds, labels, k=1):
    """Fraction of rows whose true label is among the first k predictions."""
    labels = torch.as_tensor(labels).long()
    return (preds[:, :k] == labels[:, None]).any(1).float().mean().item()


# ----------------------------------------------------------------------------- linear probe
def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=100, lr=0.1, batch_size=1024,
                 seed=0, device=torch.device("cpu")):
    """A linear classifier on frozen features, MoCo v3's main_lincls.py recipe: fc weights
    N(0, 0.01), zero bias, SGD with momentum 0.9, weight decay 0, lr = base x batch / 256
    with a cosine schedule (per iteration here), cross-entropy; the last epoch is reported
    (not the best: no peeking at the test split).

    Speed on a CPU: the backbone is frozen and in eval mode, so its features of the
    un-augmented images are computed once (extract_features) and the probe trains on that
    cache in seconds. MoCo v3 instead re-embeds random-resized crops every epoch; this
    costs the augmentation (typically a point or so of accuracy) and saves ~100 backbone
    passes. The features are standardised with the train split's mean and std (MAE's
    linear probe does the same with a BatchNorm without affine): with no weight decay a
    per-dimension affine map changes which classifier SGD reaches in a few epochs, not
    which classifiers exist, and one base lr then fits every backbone.
    Returns {"top1", "top5", "train_top1"} and the trained nn.Linear."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr = ((train_x.float() - mean) / std).to(device)
    xte = ((test_x.float() - mean) / std).to(device)
    ytr, yte = torch.as_tensor(train_y).long().to(device), torch.as_tensor(test_y).long()
    fc = nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 0.01)   # seeded N(0, 0.01)
        fc.bias.zero_()
    base_lr = lr * batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
    n = xtr.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(fc(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        test_pred = fc(xte).topk(min(5, num_classes), dim=1).indices.cpu()
        train_pred = fc(xtr).argmax(1).cpu()
    return {"top1": topk_accuracy(test_pred, yte, 1), "top5": topk_accuracy(test_pred, yte, 5),
            "train_top1": (train_pred == ytr.cpu()).float().mean().item()}, fc


# ----------------------------------------------------------------------------- semi-supervised
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
    paths = report.sample_paths(ds)
    if paths is None:
        raise UserError(f"--semi-split-file needs an image folder data set (--data folder/imagenet), not {type(ds).__name__}")
    if not os.path.isfile(path):
        raise UserError(f"--semi-split-file {path}: no such file")
    pos = {os.path.basename(p): i for i, p in enumerate(paths)}
    with open(path) as f:
        names = [os.path.basename(line.strip()) for line in f if line.strip()]
    missing = [n for n in names if n not in pos]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} files of {path} are not in the train split "
                        f"(first: {missing[0]}); use the full train split (no --train-subset)")
    return np.array(sorted(pos[n] for n in names), dtype=np.int64)


def semi_transform(name, size, crop_min):
    """SimCLR's fine-tuning augmentation (appendix B.5): random resized crop and flip only."""
    return T.Compose([T.RandomResizedCrop(size, scale=(crop_min, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])


def finetune(backbone, feat_dim, train_set, test_loader, name, num_classes, epochs, lr=0.05, batch_size=256,
             seed=0, workers=0, device=torch.device("cpu"), desc="fine-tune"):
    """Semi-supervised evaluation (Table 2): a copy of the pre-trained backbone plus a
    linear classifier, both trained on the labelled subset, then top-1 / top-5 on the test
    split (the paper reports top-5). SimCLR's recipe (appendix B.5): Nesterov momentum 0.9,
    lr = 0.05 x batch / 256, no weight decay, no warm-up, random crop and flip only; here
    with a cosine schedule. BN is in train mode (the whole network is fine-tuned). The
    evaluated backbone itself is never touched: the copy is trained."""
    torch.manual_seed(seed)
    net = nn.Sequential(copy.deepcopy(backbone), nn.Linear(feat_dim, num_classes)).to(device)
    bs = min(batch_size, len(train_set))
    loader = torch.utils.data.DataLoader(train_set, batch_size=bs, shuffle=True, num_workers=workers,
                                         drop_last=len(train_set) > bs,   # no batch of one for BN
                                         persistent_workers=workers > 0,  # not restarted every epoch
                                         generator=torch.Generator().manual_seed(seed))
    base_lr = lr * bs / 256
    opt = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    total, step = max(1, epochs * len(loader)), 0
    for epoch in tqdm(range(epochs), desc=desc, leave=False):
        net.train()
        for x, y, _ in loader:
            for group in opt.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x, y = data.to_input(x, name, device), y.to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    preds, labels = [], []
    with torch.no_grad():
        for x, y, _ in test_loader:
            with autocast(device):
                preds.append(net(data.to_input(x, name, device)).float().topk(min(5, num_classes), dim=1).indices.cpu())
            labels.append(torch.as_tensor(y))
    preds, labels = torch.cat(preds), torch.cat(labels)
    return {"top1": topk_accuracy(preds, labels, 1), "top5": topk_accuracy(preds, labels, 5)}


# ----------------------------------------------------------------------------- cluster metrics
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
    k-means on unnormalised features would weigh each image by its norm) with Faiss, best
    of nredo seeded runs, on all points (no subsampling). Returns (assignments, K x D centroids)."""
    x = np.ascontiguousarray(F.normalize(torch.as_tensor(feats).float(), dim=1).numpy())
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, spherical=True, seed=seed,
                      max_points_per_centroid=max(256, x.shape[0]), verbose=False)
    km.index = flat_ip_index(x.shape[1], device)   # this process's GPU only (gpu=True takes every one)
    km.train(x)
    _, ids = km.index.search(x, 1)
    return ids[:, 0].astype(np.int64), torch.from_numpy(km.centroids.copy())


def pixel_kmeans(pixels, k, seed=0, n_init=10):
    """The raw-pixel floor as the clustering literature reports it (DEC and its successors):
    scikit-learn's (Euclidean) KMeans on pixels in [0, 1], n_init = 10, seeded."""
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(pixels, dtype=np.float32))


def assign_clusters(z, centroids, device=None):
    """Each embedding's nearest centroid by cosine (the hard E-step of eq. 8, Faiss search),
    with two confidences: the cosine to that centroid and its margin over the second
    nearest. Returns (cluster ids, cosine, margin) as numpy arrays."""
    k = min(2, centroids.shape[0])
    z = F.normalize(torch.as_tensor(z).float(), dim=1).numpy()
    sims, ids = knn_search(z, F.normalize(torch.as_tensor(centroids).float(), dim=1).numpy(), k, device)
    margin = sims[:, 0] - sims[:, 1] if k == 2 else sims[:, 0].copy()
    return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32), margin.astype(np.float32)


# ----------------------------------------------------------------------------- summary
def summary_table(res):
    """The readable side of results.json: one row per number, features next to raw pixels."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"
    src = res["source"]
    lines = [f"SiamMM evaluation | {src['arch']} on {src['data']} ({src['img_size']} px, {src['encoder']} backbone"
             f"{', epoch ' + str(src['epoch']) if src.get('epoch') else ''}) | train {res['split']['train']} -> "
             f"test {res['split']['test']} | {res['device']}"]
    rows = [("metric", "features", "raw pixels")]
    raw = res.get("raw_pixels") or {}
    for k, acc in res["knn"]["top1"].items():
        rows.append((f"kNN top-1, k={k} (T={res['knn']['T']}, cosine)", f(acc), f((raw.get("knn_top1") or {}).get(k))))
    if res.get("linear_probe"):
        rows.append((f"linear probe top-1 ({res['linear_probe']['epochs']} ep)", f(res["linear_probe"]["top1"]), "-"))
    for pct, r in (res.get("semi") or {}).items():
        rows.append((f"fine-tune {pct}% labels ({r['labels']}): top-1", f(r["top1"]), "-"))
        rows.append((f"fine-tune {pct}% labels: top-5 (Table 2)", f(r["top5"]), "-"))
    km, rk = res["kmeans"], raw.get("kmeans") or {}
    for key, name in (("hungarian_acc", "Hungarian ACC"), ("nmi", "NMI"), ("ari", "ARI"), ("ami", "AMI")):
        rows.append((f"k-means K={km['K']} on {km['split']}: {name}", f(km[key]), f(rk.get(key))))
    lc = res.get("learned_clusters")
    if lc:
        for key, name in (("ami", "AMI"), ("nmi", "NMI"), ("ari", "ARI"), ("majority_acc", "majority ACC")):
            rows.append((f"learned clusters K={lc['K_mixture']} ({lc['K']} used) on {lc['split']}: {name}", f(lc[key]), "-"))
        if lc.get("hungarian_acc") is not None:
            rows.append(("learned clusters: Hungarian ACC", f(lc["hungarian_acc"]), "-"))
    w0 = max(len(r[0]) for r in rows)
    lines += [f"{a:<{w0}}  {b:>10}  {c:>10}" for a, b, c in rows]
    rep = res["report"]
    lines.append(f"backbone unchanged by the evaluation: {'yes' if res['backbone_unchanged'] else 'NO'}")
    lines.append(f"suspected mislabels ({rep['split']} split, votes of {rep['votes']}): "
                 f"{rep['num_suspects']} -> {rep['mislabels_csv']}")
    lines.append(f"results: {res['results_path']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def loader_for(ds, args, device):
    """Every image once, in batches of --batch-size cut from a seeded permutation, with no
    batch of a single image: the momentum embedding normalises with batch statistics, as
    train.py's feature pass does, and an image folder lists its images sorted by class, so
    consecutive batches would each hold one class (data.feature_batches)."""
    return torch.utils.data.DataLoader(ds, batch_sampler=data.feature_batches(len(ds), args.batch_size, seed=args.seed),
                                       num_workers=args.workers, pin_memory=device.type == "cuda")


def load_model(args, device):
    """The backbone to measure, the embedding the mixture was fit on (or None) and the
    mixture (or None), from --checkpoint or --backbone."""
    if args.checkpoint:
        model, mixture, train_args = load_checkpoint(args)
        model = model.to(device)
        backbone = model.backbone if args.encoder == "online" else model.momentum_backbone
        # the embedding exactly as train.py's feature pass made it (BN statistics included)
        feature_bn = train_args.get("feature_bn", "running")   # checkpoints older than the flag: running
        return backbone, model.feat_dim, (lambda x: model.embed(x, feature_bn)), mixture, train_args
    if args.encoder != "online":
        raise UserError("--encoder momentum needs a --checkpoint (an exported backbone is the online one)")
    backbone, feat_dim = load_backbone(args)
    return backbone.to(device), feat_dim, None, None, {}


def representation(feats, num_classes, args, device, times):
    """Weighted kNN (DINO) and the quick linear probe on cached features, train -> test."""
    (ftr, _, ytr), (fte, _, yte) = feats["train"], feats["test"]
    t0 = time.time()
    preds = knn_classify(ftr, ytr, fte, args.knn_k, args.knn_t, num_classes, device=device)
    knn = {"T": args.knn_t, "top1": {str(k): topk_accuracy(p, yte, 1) for k, p in preds.items()},
           "top5": {str(k): topk_accuracy(p, yte, 5) for k, p in preds.items()}}
    times["knn"] = time.time() - t0
    probe = None
    if args.probe_epochs:
        t0 = time.time()
        probe, _ = linear_probe(ftr, ytr, fte, yte, num_classes, args.probe_epochs, args.probe_lr,
                                args.probe_batch_size, args.seed, device)
        probe |= {"epochs": args.probe_epochs, "lr": args.probe_lr, "batch_size": args.probe_batch_size}
        times["linear_probe"] = time.time() - t0
    return knn, probe


def clusters(feats, mixture, num_classes, args, device):
    """Table 3 on --metrics-split: k-means with K = number of classes on the backbone
    features (Hungarian accuracy), and the learned clusters: each image's momentum
    embedding to its nearest centroid of the checkpoint's mixture."""
    mfeat, memb, mlab = feats[args.metrics_split]
    km_ids, _ = spherical_kmeans(mfeat, num_classes, args.seed, nredo=args.kmeans_redo, device=device)
    kmeans = {"split": args.metrics_split, "method": "faiss spherical k-means on L2-normalised backbone features",
              "redo": args.kmeans_redo} | cluster_metrics(mlab.numpy(), km_ids)
    learned = None
    if mixture is not None:
        ids, _, _ = assign_clusters(memb, mixture.centroids, device)
        learned = {"split": args.metrics_split, "K_mixture": int(mixture.centroids.shape[0])} | cluster_metrics(mlab.numpy(), ids)
        if learned["K_mixture"] != num_classes:   # Hungarian accuracy only when K = number of classes
            learned["hungarian_acc"] = None
    return kmeans, learned


def raw_baselines(feats, num_classes, args, device):
    """The floor: the same kNN and k-means on raw pixels of the same images."""
    rtf = data.raw_transform(args.data, args.raw_size)
    rtr, rte = (raw_pixels(loader_for(data.subset(data.load_dataset(args.data, args.data_dir, split, rtf), n, args.seed),
                                      args, device), f"raw pixels {name}")
                for name, split, n in (("train", "train", args.train_subset), ("test", "val", args.test_subset)))
    ytr, yte, mlab = feats["train"][2], feats["test"][2], feats[args.metrics_split][2]
    rpreds = knn_classify(rtr, ytr, rte, args.knn_k, args.knn_t, num_classes, device=device)
    rsplit = rtr if args.metrics_split == "train" else rte
    return {"knn_top1": {str(k): topk_accuracy(p, yte, 1) for k, p in rpreds.items()},
            "kmeans": {"split": args.metrics_split, "method": "scikit-learn KMeans on pixels in [0, 1], n_init 10"}
            | cluster_metrics(mlab.numpy(), pixel_kmeans(rsplit.numpy(), num_classes, args.seed))}


def semi_supervised(backbone, feat_dim, train_set, test_set, ytr, num_classes, train_args, args, device):
    """Table 2: fine-tune copies of the backbone on 1% / 10% of the labels (SimCLR)."""
    semi = {}
    crop_min = args.semi_crop_min or train_args.get("crop_min") or 0.08
    aug = semi_transform(args.data, args.img_size, crop_min)
    aug_train = data.subset(data.load_dataset(args.data, args.data_dir, "train", aug), args.train_subset, args.seed)
    for n, pct in enumerate(args.semi):
        idx = (split_file_subset(train_set, args.semi_split_file[n]) if args.semi_split_file
               else balanced_subset(ytr.numpy(), pct, args.seed))
        epochs_ft = args.semi_epochs or (60 if pct <= 1 else 30)
        r = finetune(backbone, feat_dim, torch.utils.data.Subset(aug_train, idx), loader_for(test_set, args, device),
                     args.data, num_classes, epochs_ft, args.semi_lr, args.semi_batch_size, args.seed, args.workers,
                     device, desc=f"fine-tune {pct:g}%")
        semi[f"{pct:g}"] = r | {"labels": int(len(idx)), "epochs": epochs_ft, "crop_min": crop_min,
                                "split": args.semi_split_file[n] if args.semi_split_file else "class-balanced, seeded"}
    return semi


def evaluate(args):
    t_start, times = time.time(), {}
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU: use --device cpu")
    backbone, feat_dim, embed, mixture, train_args = load_model(args, device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    source_path = args.checkpoint or args.backbone
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(source_path)), "eval")
    digest = utils.state_digest(backbone)     # MoCo v3's sanity check, compared at the end

    # ---- data: the full train split -> the full test split unless subsets are asked for
    tf = data.eval_transform(args.data, args.img_size)
    train_set = data.subset(data.load_dataset(args.data, args.data_dir, "train", tf, args.download),
                            args.train_subset, args.seed)
    test_set = data.subset(data.load_dataset(args.data, args.data_dir, "val", tf, args.download), args.test_subset, args.seed)
    classes = getattr(train_set, "classes", None)
    os.makedirs(os.path.join(out_dir, "clusters"), exist_ok=True)   # only once the data loads
    print(f"evaluating {source_path} | {args.arch} on {args.data} | train {len(train_set)} -> test {len(test_set)} | {device}")

    # ---- frozen features of both splits (and the momentum embeddings, for the clusters)
    t0 = time.time()
    feats = {name: extract_features(loader_for(ds, args, device), args.data, backbone, embed, device, desc=f"features {name}")
             for name, ds in (("train", train_set), ("test", test_set))}
    num_classes = len(classes) if classes else int(max(feats["train"][2].max(), feats["test"][2].max())) + 1
    times["features"] = time.time() - t0

    knn, probe = representation(feats, num_classes, args, device, times)
    t0 = time.time()
    kmeans, learned = clusters(feats, mixture, num_classes, args, device)
    times["clusters"] = time.time() - t0
    raw = None
    if not args.no_raw:
        t0 = time.time()
        raw = raw_baselines(feats, num_classes, args, device)
        times["raw_pixels"] = time.time() - t0

    # ---- the cluster report (Fig. 2, Fig. 3, sec. 6.8): the checkpoint's mixture, else k-means
    t0 = time.time()
    rfeat, remb, rlab = feats[args.report_split]
    rds = train_set if args.report_split == "train" else test_set
    if mixture is not None:
        assignment = assign_clusters(remb, mixture.centroids, device)
        source = "the checkpoint's mixture (momentum embeddings -> nearest centroid)"
    else:   # an exported backbone has no mixture: spherical k-means, K = classes, on its features
        _, cents = spherical_kmeans(rfeat, num_classes, args.seed, nredo=args.kmeans_redo, device=device)
        assignment = assign_clusters(rfeat, cents, device)
        source = f"spherical k-means (K = {num_classes}) on backbone features"
    run_dir = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else None
    rep = report.cluster_report(out_dir, rds, rfeat, rlab.numpy(), classes, assignment, args, device,
                                report.read_k_history(run_dir, mixture), train_args.get("num_clusters"))
    rep["cluster_source"] = source
    times["report"] = time.time() - t0

    semi = {}
    if args.semi:
        t0 = time.time()
        semi = semi_supervised(backbone, feat_dim, train_set, test_set, feats["train"][2], num_classes, train_args,
                               args, device)
        times["semi"] = time.time() - t0

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
                     "note": f"kNN / probe / fine-tuning: train -> test; cluster metrics on {args.metrics_split}; "
                             f"report on {args.report_split}"},
           "device": str(device), "knn": knn, "linear_probe": probe, "semi": semi or None,
           "learned_clusters": learned, "kmeans": kmeans, "raw_pixels": raw, "report": rep,
           "backbone_unchanged": not changed, "time_s": {k: round(v, 2) for k, v in times.items()},
           "results_path": os.path.join(out_dir, "results.json")}
    with open(res["results_path"], "w") as f:
        json.dump(res, f, indent=1)
    print(summary_table(res))
    return res


def main(argv=None):
    args = get_args(argv)
    try:
        return evaluate(args)
    except UserError as e:
        utils.fail("evaluate.py", e)


if __name__ == "__main__":
    main()
