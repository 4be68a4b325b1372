"""
Fashion-MNIST written as an image folder sorted by class, the way torchvision's ImageFolder
lists ImageNet: train/<class>/*.png and val/<class>/*.png (the test split). Fashion-MNIST's
idx files come shuffled, a folder does not; training with `--data folder` on this folder
shows what the class order of a real image folder does to the pipeline.

    python bench/fmnist_folder.py --out /tmp/fmnist_folder             # all 60,000 + 10,000
    python train.py --data folder --data-dir /tmp/fmnist_folder --out-dir runs/folder

The tests use the same writer on a few hundred images (tests/conftest.py).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def write_class_folder(root, per_class=0, val_per_class=0, classes=10, fmt="png", size=None, first=0):
    """Real Fashion-MNIST images as train/ and val/ class sub-folders: the first `per_class`
    train images (val/: `val_per_class` test images) of each of `classes` classes from class
    `first` on, 0 = all of them. Grayscale PNG, or RGB JPEG (resized to `size`) like ImageNet's files.
    The folder names keep the class order (00_T-shirt-top, 01_Trouser, ...), so ImageFolder's
    labels are Fashion-MNIST's."""
    for split, n, train in (("train", per_class, True), ("val", val_per_class, False)):
        ds = data.FashionMNIST(None, train=train)
        labels = ds.targets.numpy()
        for c in range(first, first + classes):
            folder = os.path.join(root, split, f"{c:02d}_{ds.classes[c].replace('/', '-')}")
            os.makedirs(folder, exist_ok=True)
            members = np.flatnonzero(labels == c)
            for j, i in enumerate(members[:n] if n else members):
                img = Image.fromarray(ds.images[i])
                if fmt == "jpg":
                    img = img.convert("RGB")
                    img = img.resize((size, size)) if size else img
                img.save(os.path.join(folder, f"{j:05d}.{fmt}"))
    return str(root)


def write_digits_folder(root, seed=0):
    """scikit-learn's bundled digits (1,797 images of 8 x 8, 10 classes) as a class-sorted
    folder: a seeded 80 / 20 split into train/ and val/, grey levels 0-16 scaled to 0-255 PNG.
    A second real data set of known class count that the CPU default was not tuned on."""
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))
    cut = int(0.8 * len(idx))
    for split, ids in (("train", idx[:cut]), ("val", idx[cut:])):
        for i in sorted(ids, key=lambda i: (d.target[i], i)):
            folder = os.path.join(root, split, str(d.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write (train/ and val/ inside)")
    p.add_argument("--per-class", type=int, default=0, help="train images per class (0 = all)")
    p.add_argument("--val-per-class", type=int, help="val images per class (default: --per-class)")
    p.add_argument("--classes", type=int, default=10, help="N Fashion-MNIST classes, from --first-class on")
    p.add_argument("--first-class", type=int, default=0, help="the first of them (0-9)")
    p.add_argument("--format", default="png", choices=["png", "jpg"])
    p.add_argument("--digits", action="store_true", help="scikit-learn's digits instead of Fashion-MNIST")
    args = p.parse_args()
    if args.digits:
        write_digits_folder(args.out)
    else:
        val = args.per_class if args.val_per_class is None else args.val_per_class
        for _ in tqdm([0], desc=f"writing {args.out}"):
            write_class_folder(args.out, args.per_class, val, classes=args.classes, fmt=args.format,
                               first=args.first_class)
    print(f"wrote {args.out}/train and {args.out}/val")


if __name__ == "__main__":
    main()
