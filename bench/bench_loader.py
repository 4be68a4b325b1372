"""
How many images per second one CPU core decodes and augments for ImageNet-sized JPEGs, for
the training views and for the feature pass, and what a resized copy of the data
(python data.py SRC DST; train.py --feature-data-dir) and a reduced-scale JPEG decode (PIL
draft) save. From that: how many cores 8 GPUs need.

    python bench/bench_loader.py                       # 256 JPEGs, one core
    python bench/bench_loader.py --n 1024 --out /tmp/jpegs

The JPEGs: real Fashion-MNIST images (apt-get install dataset-fashion-mnist), colourised,
upscaled to ImageNet's typical sizes (500 x 375 and 375 x 500, 500 x 333, and 1 in 8 large,
1024 x 768) with film-grain noise so that the files are about as large as ImageNet's
(~110 KB at quality 90): smooth upscaled images alone would decode faster than photographs.
Every measurement runs in this one process with one thread (torch, PIL): images/s per core.
The feature pass's embeddings from the copy are compared with those from the originals
(cosine of a randomly initialised ResNet-50's pooled features and of the 224 px views).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

SIZES = [(500, 375), (375, 500), (500, 333), (500, 375), (500, 375), (375, 500), (500, 333), (1024, 768)]


def write_jpegs(root, n, seed=0):
    """n JPEGs as root/train/<class>/, sizes cycling through SIZES; returns the mean file size."""
    rng = np.random.default_rng(seed)
    ds = data.FashionMNIST(None, train=True)
    total = 0
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        g = Image.fromarray(ds.images[i]).resize((w, h), Image.BICUBIC)
        tint = rng.uniform(0.4, 1.0, 3)
        a = np.asarray(g, np.float32)[..., None] * tint + rng.uniform(0, 80, 3)
        a += rng.normal(0, 14, a.shape)                       # grain: photographs' entropy
        folder = os.path.join(root, "train", f"{int(ds.targets[i]):02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:06d}.JPEG")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += os.path.getsize(path)
    return total / n


def rate(paths, fn, repeat=2):
    """Images per second of fn(path) over the paths (best of `repeat` passes: the page cache
    warm, as it is from the second epoch on)."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="JPEGs to write and read")
    p.add_argument("--out", default="/tmp/bench_loader", help="where the JPEGs and their resized copy go")
    p.add_argument("--size", type=int, default=224, help="crop size (the ImageNet presets': 224)")
    p.add_argument("--step-rate", type=float, default=9000.0,
                   help="images/s one 8-GPU node trains at (ResNet-50, two views, bf16: ~9-12k on 8 x H100; "
                        "bench/check_gpu_data.py measures it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    src, copy = os.path.join(args.out, "orig"), os.path.join(args.out, "copy")
    if not os.path.isdir(src):
        kb = write_jpegs(src, args.n) / 1024
        print(f"wrote {args.n} JPEGs to {src}: {kb:.0f} KB on average (ImageNet's train split: ~110 KB)")
    if not os.path.isdir(copy):
        data.resized_copy(src, copy, 256, workers=1)
    originals = sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs)
    copies = [os.path.join(copy, os.path.relpath(q, src)) for q in originals]
    train_tf = data.train_transform(args.size, 0.08)
    eval_tf = data.eval_transform("imagenet", args.size)
    side = int(args.size * 256 / 224)
    cases = [
        ("training: decode + two MoCo v3 views", originals, lambda q: train_tf(data.load_image(q))),
        ("feature pass: decode + resize + centre crop", originals, lambda q: eval_tf(data.load_image(q))),
        ("feature pass, reduced-scale decode (draft)", originals, lambda q: eval_tf(data.load_image(q, draft=side))),
        ("feature pass from the resized copy (--feature-data-dir)", copies, lambda q: eval_tf(data.load_image(q))),
        ("decode alone, original", originals, lambda q: data.load_image(q)),
        ("decode alone, resized copy", copies, lambda q: data.load_image(q)),
    ]
    print(f"\n| path | images/s per core | cores for {args.step_rate:,.0f} images/s |")
    print("| --- | --- | --- |")
    for name, paths, fn in cases:
        r = rate(paths, fn)
        print(f"| {name} | {r:.0f} | {args.step_rate / r:.0f} |", flush=True)

    # the copy against the originals: the same view up to resampling and re-encoding
    a = torch.stack([eval_tf(data.load_image(q)) for q in originals]).float()
    b = torch.stack([eval_tf(data.load_image(q)) for q in copies]).float()
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    net.eval()
    torch.set_num_threads(os.cpu_count())
    with torch.no_grad():
        fa = torch.cat([net((a[i:i + 32] / 255 - 0.45) / 0.225) for i in range(0, len(a), 32)])
        fb = torch.cat([net((b[i:i + 32] / 255 - 0.45) / 0.225) for i in range(0, len(b), 32)])
    cos = F.cosine_similarity(fa, fb)
    print(f"\nresized copy against full decode ({len(a)} images): pixels of the 224 px view differ by "
          f"{(a - b).abs().mean():.2f} / 255 on average; ResNet-50 (random init) features: cosine mean "
          f"{cos.mean():.5f}, min {cos.min():.5f}")


if __name__ == "__main__":
    main()
