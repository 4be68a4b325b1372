"""
The cluster report of evaluate.py: what the paper shows of its clusters, for a person to
look at beside the numbers.

    Fig. 2      K per epoch, falling by merging from K0 towards the number of classes
    Fig. 3      one image grid per cluster, a row per true class
    sec. 6.8    suspected mislabels: images whose label their neighbourhood votes against,
                ranked by confident learning's self-confidence (Northcutt et al. 2021)

cluster_report() writes them all; the rest are its parts.
"""

import csv
import json
import math
import os

import matplotlib
matplotlib.use("Agg")  # files only, no display: works on a headless server
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from search import knn_votes, torch_search  # noqa: E402


def cluster_report(out_dir, ds, feats, labels, classes, assignment, args, device=None, k_history=None, k0=None):
    """Fig. 2, Fig. 3 and sec. 6.8 for one split: k_per_epoch.png, clusters/cluster_*.png,
    mislabels.csv and mislabels.png in out_dir. assignment: (cluster ids, cosine, margin) of
    every image of ds, from the checkpoint's mixture or from k-means. Returns the report's
    entries for results.json."""
    num_classes = len(classes) if classes else int(labels.max()) + 1
    report = {"split": args.report_split}
    epochs, ks = k_history or ([], [])
    if ks:
        report["k_per_epoch"] = os.path.join(out_dir, "k_per_epoch.png")
        report["k_history"] = dict(zip(map(str, epochs), ks))
        start = ([0], [k0]) if k0 else ([], [])
        plot_k_history({"K (learned clusters)": (start[0] + list(epochs), start[1] + list(ks))}, report["k_per_epoch"],
                       num_classes)
    rids, rcos, rmargin = assignment
    labels = np.asarray(labels)
    conf = rcos if args.confidence == "cosine" else rmargin
    if args.mislabel_votes == "knn":
        suggested, share = knn_label_votes(feats, labels, args.knn_k[0], args.knn_t, num_classes, device)
        report["votes"] = f"the {args.knn_k[0]} nearest other {args.report_split} images (backbone features, weighted kNN)"
    else:
        suggested, share = cluster_label_votes(labels, rids)
        report["votes"] = "the image's cluster (its label counts)"
    order = mislabel_ranking(labels, suggested, share, conf)
    thumb = data.SPECS[args.data].thumb
    cids, sizes = np.unique(rids, return_counts=True)
    report["cluster_grids"] = []
    for rank, j in enumerate(tqdm(np.argsort(-sizes, kind="stable")[:args.grid_clusters], desc="cluster grids", leave=False)):
        members = np.flatnonzero(rids == cids[j])
        maj = int(np.bincount(labels[members]).argmax())
        purity = float(np.mean(labels[members] == maj))
        path = os.path.join(out_dir, "clusters", f"cluster_{rank + 1:03d}_id{int(cids[j])}.png")
        cluster_grid(ds, members, labels, conf, classes, path, size=thumb, cols=args.grid_cols,
                     title=f"cluster {int(cids[j])}: {len(members)} images, majority {class_name(classes, maj)} "
                           f"({purity:.0%}); rows = true class")
        report["cluster_grids"].append(path)
    report["mislabels_csv"] = os.path.join(out_dir, "mislabels.csv")
    report["mislabels_png"] = os.path.join(out_dir, "mislabels.png")
    report["num_suspects"] = int(len(order))
    report["confidence"] = args.confidence
    write_mislabels_csv(report["mislabels_csv"], order, labels, suggested, share, rids, rcos, rmargin, classes,
                        data.sample_paths(ds), ds.idx.numpy() if isinstance(ds, data.IndexedSubset) else None)
    mislabel_grid(ds, order, labels, suggested, classes, report["mislabels_png"], args.mislabel_votes,
                  args.mislabel_show, size=thumb)
    return report


def summary_table(res):
    """The readable side of results.json: one row per number, features next to raw pixels."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"
    src = res["source"]
    lines = [f"SiamMM evaluation | {src['arch']} on {src['data']} ({src['img_size']} px, {src['encoder']} backbone"
             f"{', epoch ' + str(src['epoch']) if src.get('epoch') else ''}) | train {res['split']['train']} -> "
             f"test {res['split']['test']} | {res['device']}"]
    rows = [("metric", "features", f"raw pixels ({res['raw_pixels']['side']} px)" if res.get("raw_pixels") else "raw pixels")]
    raw = res.get("raw_pixels") or {}
    for k, acc in res["knn"]["top1"].items():
        rows.append((f"kNN top-1, k={k} (T={res['knn']['T']}, cosine)", f(acc), f((raw.get("knn_top1") or {}).get(k))))
    if res.get("linear_probe"):
        rows.append((f"quick linear probe top-1 ({res['linear_probe']['epochs']} ep, cached)", f(res["linear_probe"]["top1"]), "-"))
    km, rk = res["kmeans"], raw.get("kmeans") or {}
    for key, name in (("hungarian_acc", "Hungarian ACC"), ("nmi", "NMI"), ("ari", "ARI"), ("ami", "AMI")):
        rows.append((f"spherical k-means K={km['K']} on {km['split']}: {name}", f(km[key]), f(rk.get(key))))
    ek = raw.get("kmeans_euclidean")
    if ek:
        rows.append((f"Euclidean k-means (scikit-learn) on {ek['split']}: Hungarian ACC / NMI", "-",
                     f"{f(ek['hungarian_acc'])} / {f(ek['nmi'])}"))
    lc = res.get("learned_clusters")
    if lc:
        for key, name in (("ami", "AMI"), ("nmi", "NMI"), ("ari", "ARI"), ("majority_acc", "majority ACC")):
            rows.append((f"learned clusters K={lc['K_mixture']} ({lc['K']} used) on {lc['split']}: {name}", f(lc[key]), "-"))
        if lc.get("hungarian_acc") is not None:
            rows.append(("learned clusters: Hungarian ACC", f(lc["hungarian_acc"]), "-"))
    w0, w2 = max(len(r[0]) for r in rows), max(len(r[2]) for r in rows)
    lines += [f"{a:<{w0}}  {b:>10}  {c:>{w2}}" for a, b, c in rows]
    rep = res["report"]
    lines.append(f"backbone unchanged by the evaluation: {'yes' if res['backbone_unchanged'] else 'NO'}")
    lines.append(f"suspected mislabels ({rep['split']} split, votes of {rep['votes']}): "
                 f"{rep['num_suspects']} -> {rep['mislabels_csv']}")
    lines.append(f"results: {res['results_path']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sec. 6.8: who votes on a label
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
    (cosine, an exact search over the features a block at a time) vote exp(cos / T) for
    their labels (search.knn_votes, as in evaluate.knn_classify). No image votes for itself
    (leave-one-out: an out-of-sample classifier, as confident learning asks); its exact
    duplicates do. Returns (the label with the most votes, the share of the image's own
    label in its votes)."""
    labels = np.asarray(labels)
    n, C = len(labels), num_classes or int(labels.max()) + 1
    sims, ids = torch_search(feats, feats, k, device or "cpu", exclude_self=True, normalize=True, desc="kNN vote")
    nbr, own_label = torch.from_numpy(labels[ids]).long(), torch.from_numpy(labels).long()
    suggested, share = [], []
    step = max(1, 2 ** 24 // C)          # rows x classes of votes at a time (ImageNet: 1.28M x 1000)
    for s in range(0, n, step):
        v = knn_votes(sims[s:s + step], nbr[s:s + step], T, C)
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
    Which votes: a cluster is a fine neighbourhood only while K is far above the number of
    classes; once merging brings K near it (Fig. 2), each cluster mixes look-alike classes
    and its majority outvotes many correct labels, so the nearest images are the default
    vote (measured with bench/bench_mislabels.py: bench/RESULTS.md, "The mislabel report").
    Returns the indices of the suspects, best first."""
    labels, suggested = np.asarray(labels), np.asarray(suggested)
    share, confidence = np.asarray(share, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    suspects = np.flatnonzero(labels != suggested)
    return suspects[np.lexsort((-confidence[suspects], share[suspects]))]   # last key sorts first


# ----------------------------------------------------------------------------- Fig. 2, Fig. 3 and the files
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


def plot_k_history(curves, path, num_classes=None):
    """Fig. 2: the number of clusters K per epoch, falling by merging (eq. 11) from K0 towards
    the number of true classes (dashed line). curves: {label: (epochs, Ks)}, K0 at epoch 0
    where known. Log scale when K spans a decade or more."""
    fig, ax = plt.subplots(figsize=(6, 4))
    every = [k for _, ks in curves.values() for k in ks]
    for label, (epochs, ks) in curves.items():
        ax.plot(epochs, ks, marker="o", ms=3, label=label)
    if num_classes:
        ax.axhline(num_classes, ls="--", c="gray", label=f"true classes ({num_classes})")
    if every and max(every) >= 10 * max(min(every), 1):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("number of clusters K")
    ax.set_title("K per epoch (merging, eq. 11; emptied clusters drop too)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) > 1 else None)
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
