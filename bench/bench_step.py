"""
Images/s of one SiamMM training step (two views through the online and momentum branches,
eq. 13 with the cluster term, backward, optimiser step, EMA update), and of the feature
pass (one momentum forward per image), on random data.

    python bench/bench_step.py                                  # CPU preset: resnet18, small stem, 16 px
    python bench/bench_step.py --preset imagenet-100ep --batch-size 256   # ResNet-50 at 224 px (GPU)

    python bench/bench_step.py --preset imagenet-100ep --batch-size 512 --cluster-weight 0   # instance-only

The step is the one train.py runs (same model, loss, optimiser, AMP, channels_last and CUDA
settings: utils.fast_cuda); the cluster term uses random centroids, so no data or Faiss is
needed; --cluster-weight 0 leaves it out as train.py does (the paper's instance-only
baseline). Also printed: the FLOP of one step per image (torch's FlopCounterMode: convolutions
and matrix products of both branches, forward and backward) and, on a GPU, the peak memory
and the achieved TFLOP/s as a share of --peak-tflops.
"""

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from cluster import Assignment  # noqa: E402
from loss import siammm_loss  # noqa: E402


def seconds_per_call(fn, warmup, calls, dev, desc):
    """Mean wall time of fn() after warm-up calls (CUDA: synchronised, so the kernels count)."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in tqdm(range(calls), desc=desc):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - t0) / calls


def main():
    p = argparse.ArgumentParser(description="Images/s of one SiamMM training step; every other flag is train.py's")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak for the share printed (H100/H200 SXM: 989)")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on a GPU, 5 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the two-branch forward (inductor); its "
                                                           "compile time is printed apart")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the figures to this JSON file (bench/device_check.sh reads it)")
    p.add_argument("--profile", help="also profile --steps steps with torch.profiler after the timing and write the "
                                     "operators' table, the costliest first, to this file")
    mine, rest = p.parse_known_args()
    args = train.get_args(rest + ["--workers", "0"])
    dev = utils.setup_distributed(args).device
    utils.fast_cuda(dev)
    if mine.threads:
        torch.set_num_threads(mine.threads)
    B = args.batch_size
    model = train.model_config(args).build().to(dev)   # --width included
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = train.build_optimizer(model.online_parameters(), args)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and args.amp == "fp16")
    c = data.SPECS[args.data].channels
    x1 = torch.randn(B, c, args.img_size, args.img_size, device=dev)
    x2 = torch.randn(B, c, args.img_size, args.img_size, device=dev)
    if dev.type == "cuda":
        x1, x2 = x1.to(memory_format=torch.channels_last), x2.to(memory_format=torch.channels_last)
    K = args.num_clusters if dev.type == "cuda" else min(args.num_clusters, 10000)   # a GPU: K0 itself (100k)
    centroids = torch.nn.functional.normalize(torch.randn(K, args.dim, device=dev), dim=1)
    nbr = torch.randint(0, K, (B, args.soft_k), device=dev)
    rows = Assignment(centroids, torch.ones(K, device=dev), nbr, torch.full((B, args.soft_k), 1.0 / args.soft_k, device=dev))
    rows = rows if args.cluster_weight > 0 else None   # instance-only: no cluster term at all (train.py)
    forward = torch.compile(model) if mine.compile else model

    def step():
        with utils.autocast(dev, args.amp):
            q1, q2, k1, k2 = forward(x1, x2)
        loss, _, _ = siammm_loss(q1.float(), q2.float(), k1.float(), k2.float(), rows, instance=args.instance_loss,
                                 cluster=args.cluster_loss, **vars(args))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.update_momentum(0.99)

    warmup, steps = (3, 20) if dev.type == "cuda" else (1, 5)
    steps = mine.steps or steps
    if mine.compile:
        t0 = time.time()
        step()
        print(f"  torch.compile: the first step took {time.time() - t0:.1f} s")
    with FlopCounterMode(display=False) as fc:   # one step, counted (not timed)
        step()
    flop = fc.get_total_flops() / B
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dt = seconds_per_call(step, warmup, steps, dev, "steps")
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None

    # The feature pass (train.feature_pass): one momentum forward per image, batch-statistics
    # BN, at --feature-batch-size. Its images/s against the step's bound how much a SiamMM
    # epoch can cost over an instance-only one (1 + step time / pass time per image), before
    # data loading and the E/M step (the paper measured 1.54x).
    F_B = args.feature_batch_size
    xf = torch.randn(F_B, c, args.img_size, args.img_size, device=dev)
    if dev.type == "cuda":
        xf = xf.to(memory_format=torch.channels_last)

    def embed():
        with utils.autocast(dev, args.amp):
            model.embed(xf, args.feature_bn)

    model.eval()
    with FlopCounterMode(display=False) as fc:
        embed()
    flop_f = fc.get_total_flops() / F_B
    df = seconds_per_call(embed, warmup, steps, dev, "feature pass")

    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    kind = "SiamMM" if rows is not None else "instance-only"
    print(f"{args.arch} width {args.width} {args.img_size}px on {name} (amp {args.amp if dev.type == 'cuda' else 'off'}):")
    print(f"  training step, batch {B}: {dt * 1000:.0f} ms/step, {B / dt:.1f} images/s ({kind})")
    print(f"  feature pass, batch {F_B}: {df * 1000:.0f} ms/batch, {F_B / df:.1f} images/s; "
          f"a pass costs {(df / F_B) / (dt / B):.3f} of a training epoch on the same images")
    achieved = flop * B / dt / 1e12
    share = f" = {100 * achieved / mine.peak_tflops:.1f}% of {mine.peak_tflops:g}" if dev.type == "cuda" else ""
    print(f"  FLOP per image: step {flop / 1e9:.2f} GFLOP, feature pass {flop_f / 1e9:.2f} GFLOP; "
          f"step {achieved:.2f} TFLOP/s{share}")
    if peak_mem is not None:
        print(f"  peak memory of the step: {peak_mem:.1f} GiB")
    if mine.profile:   # where the step's time goes, operator by operator
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        model.train()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        with open(mine.profile, "w") as f:
            f.write(f"{args.arch} {args.img_size}px batch {B} on {name}, {steps} step(s), amp {args.amp}\n{table}\n")
        print("\n".join(table.splitlines()[:18]))
    if mine.json:
        with open(mine.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "arch": args.arch,
                       "img_size": args.img_size, "batch": B, "amp": args.amp, "kind": kind, "step_ms": dt * 1000,
                       "step_images_per_s": B / dt, "feature_images_per_s": F_B / df, "flop_per_image": flop,
                       "feature_flop_per_image": flop_f, "tflops": achieved,
                       "peak_share": achieved / mine.peak_tflops if dev.type == "cuda" else None,
                       "peak_mem_gib": peak_mem}, f, indent=1)


if __name__ == "__main__":
    main()
