"""
Evaluation of SiamMM (arXiv 2511.05462): what the paper measures (SPEC section 4), on
Fashion-MNIST or any ImageFolder data set, on a CPU or a GPU, in one run.

    representation  weighted kNN on frozen backbone features (DINO protocol) and a linear
                    probe on the frozen backbone (MoCo v3 protocol), train split -> test
                    split; optional semi-supervised fine-tuning on 1% / 10% of the labels
                    (Table 2)
    clusters        AMI, NMI, ARI and majority-label accuracy of the learned clusters
                    (Table 3); Hungarian accuracy of k-means with K = number of classes
    cluster report  K per epoch (Fig. 2), one image grid per cluster with a row per true
                    class (Fig. 3), and suspected mislabels (sec. 6.8)
    floor           the same kNN and k-means on raw pixels, on the same split

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
probe, fine-tuning, cluster metrics, cluster report, main.
"""

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
import time

import faiss
import matplotlib
matplotlib.use("Agg")  # files only, no display: works on a headless server
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.cluster import KMeans
from torchvision.utils import make_grid
from tqdm import tqdm

import data
from cluster import VMFMixture, flat_ip_index, knn_search
from model import SiamMM, build_backbone, model_args
from train import autocast  # bf16 on a GPU, exact fp32 on a CPU


class EvalError(Exception):
    """A problem with the user's input (a path, a flag): printed as one line, no traceback."""


# ----------------------------------------------------------------------------- config
def fail(msg):
    """One clear line for a person, no traceback, exit status 2 (as argparse does)."""
    print(f"evaluate.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints its whole usage block first; a person needs the one line
        fail(f"{message} (see --help)")


def get_args(argv=None):
    p = Parser(prog="evaluate.py", description="Evaluate a SiamMM checkpoint or backbone",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py checkpoint (model, mixture and the training flags)")
    src.add_argument("--backbone", help="an exported backbone state_dict (SiamMM.export_backbone); "
                     "give --arch, --data, --img-size (small stem and channels are read from its conv1)")
    # data and model: unset flags are read from the checkpoint's training flags
    p.add_argument("--data", choices=["fashion-mnist", "folder", "imagenet"], help="default: the checkpoint's, else fashion-mnist")
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
    p.add_argument("--raw-size", type=int, default=32, help="folders: raw pixels of a centre crop of this size "
                   "(fashion-mnist always uses its native 28 x 28)")
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
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device {args.device!r}: auto, cpu or cuda")
    return args


# ----------------------------------------------------------------------------- loading
def load_checkpoint(args):
    """A train.py checkpoint -> (SiamMM in eval mode, VMFMixture or None, training flags).

    The model settings (arch, stem, head widths, D) always come from the checkpoint; the
    data settings come from it unless a flag overrides them (the data may have moved)."""
    path = args.checkpoint
    if not os.path.isfile(path):
        raise EvalError(f"--checkpoint {path}: no such file (train.py writes OUT_DIR/checkpoint.pth)")
    try:
        # weights_only=False: train.py's checkpoint also holds RNG states (numpy arrays)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise EvalError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise EvalError(f"{path} is not a train.py checkpoint (no 'model' and 'args'); "
                        "for an exported backbone use --backbone")
    targs = ckpt["args"]
    args.data = args.data or targs["data"]
    args.data_dir = targs.get("data_dir", "") if args.data_dir is None else args.data_dir
    args.img_size = args.img_size or targs["img_size"]
    if args.arch and args.arch != targs["arch"]:
        raise EvalError(f"--arch {args.arch} differs from the checkpoint's {targs['arch']}: drop --arch")
    args.arch, args.small_stem = targs["arch"], targs["small_stem"]
    in_chans = data.in_channels(targs["data"])
    if data.in_channels(args.data) != in_chans:
        raise EvalError(f"the checkpoint was trained on {targs['data']} ({in_chans} channels); "
                        f"--data {args.data} has {data.in_channels(args.data)}")
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
        raise EvalError(f"{path} does not fit the model its flags describe: "
                        + next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])) from None
    missing = [k for k in missing if k.startswith(used)]
    if missing:
        raise EvalError(f"{path} lacks {len(missing)} tensors of the backbone / momentum encoder (e.g. {missing[0]})")
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
        raise EvalError(f"--backbone {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"cannot read backbone {path}: {e}") from None
    if not isinstance(sd, dict) or "conv1.weight" not in sd:
        hint = " (a train.py checkpoint: use --checkpoint)" if isinstance(sd, dict) and "model" in sd else ""
        raise EvalError(f"{path} is not a ResNet backbone state_dict (no conv1.weight){hint}")
    args.data = args.data or "fashion-mnist"
    args.data_dir = args.data_dir or ""
    args.img_size = args.img_size or (16 if args.data == "fashion-mnist" else 224)
    args.arch = args.arch or "resnet18"
    args.small_stem = sd["conv1.weight"].shape[-1] == 3
    args.width, in_chans = sd["conv1.weight"].shape[:2]
    if in_chans != data.in_channels(args.data):
        raise EvalError(f"the backbone takes {in_chans}-channel images; --data {args.data} has {data.in_channels(args.data)}")
    try:
        net, dim = build_backbone(args.arch, args.small_stem, in_chans, args.width)
    except ValueError as e:
        raise EvalError(str(e)) from None
    try:   # every key must match (fc is an Identity, so the exported backbone has no fc.*)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        problem = (f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else
                   f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else None)
    except RuntimeError as e:   # shapes differ
        problem = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
    if problem:
        raise EvalError(f"the weights in {path} do not fit --arch {args.arch}: {problem}")
    return net.eval(), dim


def state_digest(module):
    """SHA-256 of every tensor of the state_dict, buffers included (BN running statistics):
    MoCo v3's main_lincls sanity_check, which asserts after the probe that the frozen
    backbone is bit-identical to the pre-trained one. Returns {key: digest}."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def changed_keys(module, digest):
    now = state_digest(module)
    return [k for k in digest if now.get(k) != digest[k]]


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


def raw_transform(name, size):
    """Raw pixels scaled to [0, 1], no normalisation (the floor of baselines.md): Fashion-MNIST
    at its native 28 x 28; folders as a centre crop of size x size."""
    if name == "fashion-mnist":
        return T.ToTensor()
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])


@torch.no_grad()
def raw_pixels(loader, desc="raw pixels"):
    """Every image's pixels as one flat row, in the data set's order."""
    rows = None
    for x, _, idx in tqdm(loader, desc=desc, leave=False):
        if rows is None:
            rows = torch.zeros(len(loader.dataset), x[0].numel())
        rows[idx] = x.flatten(1)
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


def sample_paths(ds):
    """The file path of every sample (ImageFolder, possibly inside data.subset), or None."""
    if hasattr(ds, "samples"):
        return [p for p, _ in ds.samples]
    if isinstance(ds, data.IndexedSubset):
        inner = sample_paths(ds.ds)
        return None if inner is None else [inner[int(i)] for i in ds.idx]
    return None


def split_file_subset(ds, path):
    """SimCLR's ImageNet label splits (1percent.txt, 10percent.txt): one file name a line,
    e.g. n01440764_10026.JPEG. Matched to the data set's files by base name."""
    paths = sample_paths(ds)
    if paths is None:
        raise EvalError(f"--semi-split-file needs an image folder data set (--data folder/imagenet), not {type(ds).__name__}")
    if not os.path.isfile(path):
        raise EvalError(f"--semi-split-file {path}: no such file")
    pos = {os.path.basename(p): i for i, p in enumerate(paths)}
    with open(path) as f:
        names = [os.path.basename(line.strip()) for line in f if line.strip()]
    missing = [n for n in names if n not in pos]
    if missing:
        raise EvalError(f"{len(missing)} of {len(names)} files of {path} are not in the train split "
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
    """k-means on the unit sphere (cosine, as the model is trained: STYLE.md lists k-means
    on unnormalised features as a common mistake) with Faiss, best of nredo seeded runs,
    on all points (no subsampling). Returns (assignments, K x D centroids)."""
    x = np.ascontiguousarray(F.normalize(torch.as_tensor(feats).float(), dim=1).numpy())
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, spherical=True, seed=seed,
                      max_points_per_centroid=max(256, x.shape[0]), verbose=False)
    km.index = flat_ip_index(x.shape[1], device)   # this process's GPU only (gpu=True takes every one)
    km.train(x)
    _, ids = km.index.search(x, 1)
    return ids[:, 0].astype(np.int64), torch.from_numpy(km.centroids.copy())


def pixel_kmeans(pixels, k, seed=0, n_init=10):
    """The raw-pixel floor exactly as baselines.md measured it: scikit-learn's (Euclidean)
    KMeans on pixels in [0, 1], n_init = 10, seeded."""
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


# ----------------------------------------------------------------------------- cluster report
def cluster_label_votes(labels, clusters):
    """The learned clusters' vote on every label (sec. 6.8): each image's cluster is its
    classifier p(label | cluster), the label counts of the cluster. Returns (the majority
    label of each image's cluster, the share of the image's own label in its cluster)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    _, cl = np.unique(clusters, return_inverse=True)
    classes, lab = np.unique(labels, return_inverse=True)
    counts = skm.cluster.contingency_matrix(lab, cl).T      # clusters x classes, as majority_accuracy's
    return classes[counts.argmax(1)][cl], counts[cl, lab] / counts.sum(1)[cl]


def knn_label_votes(feats, labels, k=20, T=0.07, num_classes=None, device=None):
    """The kNN vote on every label: each image's k nearest other images of the same split
    (cosine, Faiss search) vote exp(cos / T) for their labels, as in knn_classify. No image
    votes for itself (leave-one-out: an out-of-sample classifier, as confident learning
    asks). Returns (the label with the most votes, the share of the image's own label in
    its votes)."""
    x = F.normalize(torch.as_tensor(feats).float(), dim=1).numpy()
    labels = np.asarray(labels)
    n, C = len(labels), num_classes or int(labels.max()) + 1
    k = min(k, n - 1)
    sims, ids = knn_search(x, x, k + 1, device)
    own = ids == np.arange(n)[:, None]
    own[~own.any(1), -1] = True          # self crowded out by exact duplicates: drop the farthest instead
    sims, ids = sims[~own].reshape(n, k), ids[~own].reshape(n, k)
    w = torch.from_numpy(np.exp((sims.astype(np.float64) - 1) / T))   # exp(cos / T), rescaled: no overflow
    nbr, own_label = torch.from_numpy(labels[ids]).long(), torch.from_numpy(labels).long()
    suggested, share = [], []
    step = max(1, 2 ** 24 // C)          # rows x classes of votes at a time (ImageNet: 1.28M x 1000)
    for s in range(0, n, step):
        v = torch.zeros(len(w[s:s + step]), C, dtype=torch.float64).scatter_add_(1, nbr[s:s + step], w[s:s + step])
        suggested.append(v.argmax(1))
        share.append(v.gather(1, own_label[s:s + step, None])[:, 0] / v.sum(1))
    return torch.cat(suggested).numpy(), torch.cat(share).numpy()


def mislabel_ranking(labels, suggested, share, confidence):
    """Suspected mislabels (sec. 6.8; the paper cites confident learning, Northcutt et al.
    2021): images whose label is not the one their neighbourhood votes for, the learned
    cluster (cluster_label_votes) or the k nearest images (knn_label_votes).

    Ranking: confident learning's "self-confidence", the share of an image's own label in
    its votes, rarest first; among equal shares (same cluster, same label) the most
    confidently assigned image comes first. A trouser label among sneakers (share ~0)
    outranks a shirt among T-shirts that hold 30% shirts, which is a confusion of two
    look-alike classes, not a labelling error. (With raw-pixel k-means clusters on a 2,000-
    image subset with 2% of the labels flipped, this order put 65-85% of the flips in the
    top 2 x (number flipped); the assignment confidence alone, 10-35%.)
    Which votes (`--mislabel-votes`; bench/bench_mislabels.py, RESULTS.md "The mislabel
    report"): with 2% of Fashion-MNIST's train labels flipped, on a 48-epoch checkpoint
    whose mixture ended at K = 6, the clusters flag 40,053 of 60,000 images and rank 67% of
    the flips in the top 2 x (number flipped); the 20 nearest images flag 11,128 and rank
    91% there. A cluster is a fine neighbourhood only while K is far above the number of
    classes; once merging brings K near it (Fig. 2), each cluster mixes look-alike classes
    and its majority outvotes many correct labels. So kNN is the default vote.
    Returns the indices of the suspects, best first."""
    labels, suggested = np.asarray(labels), np.asarray(suggested)
    share, confidence = np.asarray(share, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    suspects = np.flatnonzero(labels != suggested)
    return suspects[np.lexsort((-confidence[suspects], share[suspects]))]   # last key sorts first


def read_k_history(run_dir, mixture=None):
    """K after every epoch, for Fig. 2: from the run's log.jsonl (one JSON line per epoch,
    the last line for an epoch wins after a resume; a half-written line is skipped), else
    from the mixture's k_history. Returns (epochs, Ks) lists (empty when unknown)."""
    path = os.path.join(run_dir, "log.jsonl") if run_dir else ""
    by_epoch = {}
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "K" in rec and "epoch" in rec:
                    by_epoch[int(rec["epoch"])] = int(rec["K"])
    if not by_epoch and mixture is not None and mixture.k_history:
        by_epoch = {i + 1: int(k) for i, k in enumerate(mixture.k_history)}
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def plot_k_history(epochs, ks, path, k0=None, num_classes=None):
    """Fig. 2: the number of clusters K per epoch, falling by merging (eq. 11) from K0 towards
    the number of true classes (dashed line). Log scale when K spans a decade or more."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if k0:
        epochs, ks = [0] + list(epochs), [k0] + list(ks)
    ax.plot(epochs, ks, marker="o", ms=3, label="K (learned clusters)")
    if num_classes:
        ax.axhline(num_classes, ls="--", c="gray", label=f"true classes ({num_classes})")
    if ks and max(ks) >= 10 * max(min(ks), 1):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("number of clusters K")
    ax.set_title("K per epoch (merging, eq. 11; emptied clusters drop too)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def thumbnail(ds, i, size):
    """Image i of a data set as a size x size RGB tensor in [0, 1], for the grids."""
    img = ds.image(int(i)).convert("RGB")
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])(img)


def class_name(classes, c):
    return classes[c] if classes is not None and 0 <= c < len(classes) else str(c)


def cluster_grid(ds, members, labels, confidence, classes, path, title, cols=12, max_rows=10, size=32):
    """Fig. 3: one cluster's images, one row per true class (most frequent class first, up
    to max_rows), each row its most confidently assigned images first. torchvision's
    make_grid lays the images out; matplotlib writes the class names and counts beside
    the rows."""
    row_classes, counts = np.unique(labels[members], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:max_rows]
    blank = torch.ones(3, size, size)
    tiles, names = [], []
    for c, n in zip(row_classes[order], counts[order]):
        m = members[labels[members] == c]
        m = m[np.argsort(-confidence[m], kind="stable")][:cols]
        tiles += [thumbnail(ds, i, size) for i in m] + [blank] * (cols - len(m))
        names.append(f"{class_name(classes, int(c))} ({n})")
    pad = 2
    grid = make_grid(torch.stack(tiles), nrow=cols, padding=pad, pad_value=1.0)
    h, w = grid.shape[1:]
    fig, ax = plt.subplots(figsize=(2.0 + w / 40, 0.6 + h / 40))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([pad + r * (size + pad) + size / 2 for r in range(len(names))], names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mislabel_grid(ds, order, labels, suggested, classes, path, votes="knn", show=48, cols=8, size=32):
    """The top suspected mislabels, each titled with its rank, its label and the label its
    votes suggest ("given -> suggested")."""
    order = order[:show]
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(order) == 0:
        axes[0, 0].text(0, 0.5, "no suspected mislabels", fontsize=10)
    for r, (ax, i) in enumerate(zip(axes.flat, order)):
        ax.imshow(thumbnail(ds, i, size).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"#{r + 1} {class_name(classes, int(labels[i]))}\n-> {class_name(classes, int(suggested[i]))}", fontsize=6)
    by = "its nearest images" if votes == "knn" else "the majority of its cluster"
    fig.suptitle(f"suspected mislabels: given label -> label of {by}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_mislabels_csv(path, order, labels, suggested, share, clusters, cos, margin, classes, paths=None,
                        dataset_index=None):
    """Every suspect, best first: rank, index in the evaluated split, index in the full
    split (differs with --train-subset), file (folders), label, the label its votes suggest,
    the own label's share of the votes, score = 1 - share, and its learned cluster with the
    cosine and margin of that assignment."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "index", "dataset_index", "file", "label", "label_name", "suggested", "suggested_name",
                    "label_share", "score", "cluster", "cosine", "margin"])
        for r, i in enumerate(order):
            w.writerow([r + 1, int(i), int(dataset_index[i]) if dataset_index is not None else int(i),
                        paths[i] if paths else "", int(labels[i]), class_name(classes, int(labels[i])),
                        int(suggested[i]), class_name(classes, int(suggested[i])), f"{share[i]:.4f}",
                        f"{1 - share[i]:.4f}", int(clusters[i]), f"{cos[i]:.4f}", f"{margin[i]:.4f}"])


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


def evaluate(args):
    t_start = time.time()
    times = {}
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda, but torch sees no GPU: use --device cpu")

    # ---- the model: a full checkpoint (backbone, momentum encoder, mixture) or a backbone
    mixture, train_args, run_dir = None, {}, None
    if args.checkpoint:
        model, mixture, train_args = load_checkpoint(args)
        model = model.to(device)
        backbone = model.backbone if args.encoder == "online" else model.momentum_backbone
        # the embedding exactly as train.py's feature pass made it (BN statistics included)
        feature_bn = train_args.get("feature_bn", "running")   # checkpoints older than the flag: running
        feat_dim, embed = model.feat_dim, lambda x: model.embed(x, feature_bn)
        run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    else:
        if args.encoder != "online":
            raise EvalError("--encoder momentum needs a --checkpoint (an exported backbone is the online one)")
        backbone, feat_dim = load_backbone(args)
        backbone, embed = backbone.to(device), None
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    source_path = args.checkpoint or args.backbone
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(source_path)), "eval")
    digest = state_digest(backbone)     # MoCo v3's sanity check, compared at the end

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
    feats = {}
    for name, ds in (("train", train_set), ("test", test_set)):
        feats[name] = extract_features(loader_for(ds, args, device), args.data, backbone, embed, device,
                                       desc=f"features {name}")
    num_classes = len(classes) if classes else int(max(feats["train"][2].max(), feats["test"][2].max())) + 1
    times["features"] = time.time() - t0
    (ftr, ztr, ytr), (fte, zte, yte) = feats["train"], feats["test"]

    # ---- weighted kNN, DINO protocol
    t0 = time.time()
    preds = knn_classify(ftr, ytr, fte, args.knn_k, args.knn_t, num_classes, device=device)
    knn = {"T": args.knn_t, "top1": {str(k): topk_accuracy(p, yte, 1) for k, p in preds.items()},
           "top5": {str(k): topk_accuracy(p, yte, 5) for k, p in preds.items()}}
    times["knn"] = time.time() - t0

    # ---- linear probe, MoCo v3 protocol, on the cached frozen features
    probe = None
    if args.probe_epochs:
        t0 = time.time()
        probe, _ = linear_probe(ftr, ytr, fte, yte, num_classes, args.probe_epochs, args.probe_lr,
                                args.probe_batch_size, args.seed, device)
        probe |= {"epochs": args.probe_epochs, "lr": args.probe_lr, "batch_size": args.probe_batch_size}
        times["linear_probe"] = time.time() - t0

    # ---- clusters: k-means with K = number of classes on the backbone features (Hungarian)
    t0 = time.time()
    mfeat, memb, mlab = feats[args.metrics_split]
    km_ids, _ = spherical_kmeans(mfeat, num_classes, args.seed, nredo=args.kmeans_redo, device=device)
    kmeans = {"split": args.metrics_split, "method": "faiss spherical k-means on L2-normalised backbone features",
              "redo": args.kmeans_redo} | cluster_metrics(mlab.numpy(), km_ids)
    # the learned clusters (Table 3): each image's momentum embedding -> nearest centroid
    learned = None
    if mixture is not None:
        ids, _, _ = assign_clusters(memb, mixture.centroids, device)
        learned = {"split": args.metrics_split, "K_mixture": int(mixture.centroids.shape[0])} | cluster_metrics(mlab.numpy(), ids)
        if learned["K_mixture"] != num_classes:   # SPEC 4: Hungarian accuracy only when K = number of classes
            learned["hungarian_acc"] = None
    times["clusters"] = time.time() - t0

    # ---- the raw-pixel floor, same splits
    raw = None
    if not args.no_raw:
        t0 = time.time()
        rtf = raw_transform(args.data, args.raw_size)
        rtr = raw_pixels(loader_for(data.subset(data.load_dataset(args.data, args.data_dir, "train", rtf),
                                                args.train_subset, args.seed), args, device), "raw pixels train")
        rte = raw_pixels(loader_for(data.subset(data.load_dataset(args.data, args.data_dir, "val", rtf),
                                                args.test_subset, args.seed), args, device), "raw pixels test")
        rpreds = knn_classify(rtr, ytr, rte, args.knn_k, args.knn_t, num_classes, device=device)
        rsplit = rtr if args.metrics_split == "train" else rte
        raw = {"knn_top1": {str(k): topk_accuracy(p, yte, 1) for k, p in rpreds.items()},
               "kmeans": {"split": args.metrics_split, "method": "scikit-learn KMeans on pixels in [0, 1], n_init 10"}
               | cluster_metrics(mlab.numpy(), pixel_kmeans(rsplit.numpy(), num_classes, args.seed))}
        times["raw_pixels"] = time.time() - t0

    # ---- the cluster report: K per epoch, grids, suspected mislabels
    t0 = time.time()
    report = {"split": args.report_split}
    epochs, ks = read_k_history(run_dir, mixture)
    if ks:
        report["k_per_epoch"] = os.path.join(out_dir, "k_per_epoch.png")
        report["k_history"] = dict(zip(map(str, epochs), ks))
        plot_k_history(epochs, ks, report["k_per_epoch"], train_args.get("num_clusters"), num_classes)
    rfeat, remb, rlab = feats[args.report_split]
    rds = train_set if args.report_split == "train" else test_set
    if mixture is not None:
        rids, rcos, rmargin = assign_clusters(remb, mixture.centroids, device)
        report["cluster_source"] = "the checkpoint's mixture (momentum embeddings -> nearest centroid)"
    else:   # an exported backbone has no mixture: spherical k-means, K = classes, on its features
        _, cents = spherical_kmeans(rfeat, num_classes, args.seed, nredo=args.kmeans_redo, device=device)
        rids, rcos, rmargin = assign_clusters(rfeat, cents, device)
        report["cluster_source"] = f"spherical k-means (K = {num_classes}) on backbone features"
    rlab = rlab.numpy()
    conf = rcos if args.confidence == "cosine" else rmargin
    if args.mislabel_votes == "knn":
        suggested, share = knn_label_votes(rfeat, rlab, args.knn_k[0], args.knn_t, num_classes, device)
        report["votes"] = f"the {args.knn_k[0]} nearest other {args.report_split} images (backbone features, weighted kNN)"
    else:
        suggested, share = cluster_label_votes(rlab, rids)
        report["votes"] = "the image's cluster (its label counts)"
    order = mislabel_ranking(rlab, suggested, share, conf)
    thumb = 28 if args.data == "fashion-mnist" else 64
    cids, sizes = np.unique(rids, return_counts=True)
    report["cluster_grids"] = []
    for rank, j in enumerate(tqdm(np.argsort(-sizes, kind="stable")[:args.grid_clusters], desc="cluster grids", leave=False)):
        members = np.flatnonzero(rids == cids[j])
        maj = int(np.bincount(rlab[members]).argmax())
        purity = float(np.mean(rlab[members] == maj))
        path = os.path.join(out_dir, "clusters", f"cluster_{rank + 1:03d}_id{int(cids[j])}.png")
        cluster_grid(rds, members, rlab, conf, classes, path, size=thumb, cols=args.grid_cols,
                     title=f"cluster {int(cids[j])}: {len(members)} images, majority {class_name(classes, maj)} "
                           f"({purity:.0%}); rows = true class")
        report["cluster_grids"].append(path)
    report["mislabels_csv"] = os.path.join(out_dir, "mislabels.csv")
    report["mislabels_png"] = os.path.join(out_dir, "mislabels.png")
    report["num_suspects"] = int(len(order))
    report["confidence"] = args.confidence
    write_mislabels_csv(report["mislabels_csv"], order, rlab, suggested, share, rids, rcos, rmargin, classes,
                        sample_paths(rds), rds.idx.numpy() if isinstance(rds, data.IndexedSubset) else None)
    mislabel_grid(rds, order, rlab, suggested, classes, report["mislabels_png"], args.mislabel_votes,
                  args.mislabel_show, size=thumb)
    times["report"] = time.time() - t0

    # ---- semi-supervised fine-tuning (Table 2), on copies of the backbone
    semi = {}
    if args.semi:
        t0 = time.time()
        crop_min = args.semi_crop_min or train_args.get("crop_min") or 0.08
        aug = semi_transform(args.data, args.img_size, crop_min)
        aug_train = data.subset(data.load_dataset(args.data, args.data_dir, "train", aug), args.train_subset, args.seed)
        for n, pct in enumerate(args.semi):
            idx = (split_file_subset(train_set, args.semi_split_file[n]) if args.semi_split_file
                   else balanced_subset(ytr.numpy(), pct, args.seed))
            epochs_ft = args.semi_epochs or (60 if pct <= 1 else 30)
            r = finetune(backbone, feat_dim, torch.utils.data.Subset(aug_train, idx), loader_for(test_set, args, device),
                         args.data, num_classes, epochs_ft, args.semi_lr, args.semi_batch_size, args.seed, args.workers, device,
                         desc=f"fine-tune {pct:g}%")
            semi[f"{pct:g}"] = r | {"labels": int(len(idx)), "epochs": epochs_ft,
                                    "crop_min": crop_min,
                                    "split": args.semi_split_file[n] if args.semi_split_file else "class-balanced, seeded"}
        times["semi"] = time.time() - t0

    # ---- MoCo v3's sanity check: the evaluated backbone is bit-identical to the loaded one
    changed = changed_keys(backbone, digest)
    if changed:
        raise RuntimeError(f"the frozen backbone changed during evaluation ({len(changed)} tensors, e.g. {changed[0]})")

    times["total"] = time.time() - t_start
    res = {"source": {"checkpoint": args.checkpoint, "backbone": args.backbone, "epoch": train_args.get("epoch"),
                      "arch": args.arch, "small_stem": args.small_stem, "width": args.width, "data": args.data, "img_size": args.img_size,
                      "encoder": args.encoder, "train_subset_of_pretraining": train_args.get("subset")},
           "split": {"train": len(train_set), "test": len(test_set), "train_subset": args.train_subset,
                     "test_subset": args.test_subset, "seed": args.seed, "num_classes": num_classes,
                     "note": f"kNN / probe / fine-tuning: train -> test; cluster metrics on {args.metrics_split}; "
                             f"report on {args.report_split}"},
           "device": str(device), "knn": knn, "linear_probe": probe, "semi": semi or None,
           "learned_clusters": learned, "kmeans": kmeans, "raw_pixels": raw, "report": report,
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
    except (data.DataError, EvalError) as e:
        # a DataError raised in a DataLoader worker arrives with the worker's traceback in
        # its message: its last line is the message itself
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fail(msg.removeprefix("data.DataError: ").removeprefix("DataError: "))


if __name__ == "__main__":
    main()
