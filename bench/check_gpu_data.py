"""
The data path's GPU-only parts, measured on the first GPU the project gets, in one run: can
one node's GPUs be fed, and what do precision choices cost?

    python bench/check_gpu_data.py                   # on a GPU node (a few minutes)
    python bench/check_gpu_data.py --device cpu --n 16 --batch 8    # the same code on a CPU (CI)

It prints one table (images/s on this device):
  nvjpeg          torchvision.io.decode_jpeg on the device (nvJPEG), batched, of ImageNet-
                  sized JPEGs (bench/bench_loader.py writes them; here made in memory)
  gpu views       MoCo v3's two random-resized crops + flips of a decoded batch on the
                  device (torchvision.ops.roi_align: every crop of the batch in one call)
  train step      the ImageNet preset's ResNet-50 SiamMM forward + backward on two views
                  (bf16 autocast, channels_last): the rate decoding has to reach
  feature pass    the momentum embedding of the evaluation view, bf16 and fp32, and the
                  cosine between them (train.py --feature-amp; evaluate.py --amp)
Against the CPU's figures from bench/bench_loader.py (images/s per core), the train step's
rate says how many cores per GPU a CPU decode needs, and nvjpeg whether a GPU decode frees them.
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig  # noqa: E402
from utils import autocast, fast_cuda  # noqa: E402


def jpegs(n, seed=0):
    """n encoded JPEGs of 500 x 375 (photograph-like grain), as uint8 tensors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.normal(128, 40, (47, 63, 3)).repeat(8, 0).repeat(8, 1) + rng.normal(0, 14, (376, 504, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a[:375, :500], 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def timed(fn, dev, repeat=3):
    """Seconds of the fastest of `repeat` calls (after one warm-up), synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def random_crops(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop for a whole batch on its device: one box per image, drawn as
    torchvision draws it (area fraction and log-ratio uniform; boxes kept inside the image),
    resampled by roi_align, and a random horizontal flip."""
    B, _, H, W = x.shape
    area = torch.empty(B).uniform_(*scale, generator=generator) * H * W
    logr = torch.empty(B).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator)
    w = (area * logr.exp()).sqrt().clamp(max=W)
    h = (area / logr.exp()).sqrt().clamp(max=H)
    x0 = torch.rand(B, generator=generator) * (W - w)
    y0 = torch.rand(B, generator=generator) * (H - h)
    boxes = torch.stack([torch.arange(B, dtype=torch.float), x0, y0, x0 + w, y0 + h], 1).to(x.device)
    out = torchvision.ops.roi_align(x.float(), boxes, (size, size), aligned=True)
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=512, help="JPEGs decoded per measurement")
    p.add_argument("--batch", type=int, default=256, help="training batch per GPU (the preset: 4096 / 8 = 512)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", help="also write the figures to this JSON file (bench/device_check.sh reads it)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("check_gpu_data.py: no CUDA device here (run it on a GPU node, or pass --device cpu)")
    fast_cuda(dev)   # train.py's cuDNN and TF32 settings
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    rows = []
    files = jpegs(args.n)
    n_dec = timed(lambda: torchvision.io.decode_jpeg(files, device=dev), dev, repeat=2)
    rows.append(("nvjpeg decode, 500 x 375" if dev.type == "cuda" else "decode_jpeg on the CPU", args.n / n_dec))
    imgs = torchvision.io.decode_jpeg(files[:args.batch], device=dev)
    x = torch.stack([F.interpolate(i[None].float(), size=(375, 500))[0] for i in imgs]).to(torch.uint8)
    t = timed(lambda: (random_crops(x, args.size), random_crops(x, args.size)), dev)
    rows.append(("gpu views: two random-resized crops + flips", len(x) / t))

    cfg = ModelConfig(arch="resnet50", small_stem=False, width=64, proj_hidden=4096, pred_hidden=4096, dim=256,
                      in_chans=3)
    model = cfg.build().to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    v1 = random_crops(x, args.size).sub_(114).div_(58)
    v2 = random_crops(x, args.size).sub_(114).div_(58)

    def step():
        with autocast(dev, "bf16"):
            q1, q2, k1, k2 = model(v1, v2)
            loss = 2 - F.cosine_similarity(q1, k2.detach()).mean() - F.cosine_similarity(q2, k1.detach()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rows.append((f"train step, ResNet-50 two views, batch {len(x)}, bf16", len(x) / timed(step, dev, repeat=2)))
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None

    model.eval()

    @torch.no_grad()
    def embed(amp):
        with autocast(dev, amp):
            return model.embed(v1, "batch", None).float()
    cos = F.cosine_similarity(embed("bf16"), embed("none"))
    t16, t32 = timed(lambda: embed("bf16"), dev, repeat=2), timed(lambda: embed("none"), dev, repeat=2)
    rows.append(("feature pass, bf16", len(x) / t16))
    rows.append(("feature pass, fp32", len(x) / t32))
    print(f"\n{name}\n| measurement | images/s |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v:,.0f} |")
    print(f"\nfeature pass bf16 against fp32: embedding cosine mean {cos.mean():.5f}, min {cos.min():.5f}")
    if peak is not None:
        print(f"peak memory of the train step: {peak:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "images_per_s": dict(rows), "cosine_mean": float(cos.mean()),
                       "cosine_min": float(cos.min()), "peak_mem_gib": peak}, f, indent=1)


if __name__ == "__main__":
    main()
