"""
Images/s of one SiamMM training step (two views through the online and momentum branches,
eq. 13 with the cluster term, backward, optimiser step, EMA update), and of the feature
pass (one momentum forward per image), on random data.

    python bench/bench_step.py                                  # CPU preset: resnet18, small stem, 16 px
    python bench/bench_step.py --preset imagenet-100ep --batch-size 256   # ResNet-50 at 224 px (GPU)

The step is the one train.py runs (same model, loss, optimiser, AMP and channels_last on
CUDA); the cluster term uses random centroids, so no data or Faiss is needed.
"""

import os
import sys
import time

import torch
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
    args = train.get_args(sys.argv[1:] + ["--workers", "0"])
    dev = utils.setup_distributed(args).device
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
    K = min(args.num_clusters, 10000)
    centroids = torch.nn.functional.normalize(torch.randn(K, args.dim, device=dev), dim=1)
    nbr = torch.randint(0, K, (B, args.soft_k), device=dev)
    rows = Assignment(centroids, torch.ones(K, device=dev), nbr, torch.full((B, args.soft_k), 1.0 / args.soft_k, device=dev))

    def step():
        with utils.autocast(dev, args.amp):
            q1, q2, k1, k2 = model(x1, x2)
        loss, _, _ = siammm_loss(q1.float(), q2.float(), k1.float(), k2.float(), rows, instance=args.instance_loss,
                                 cluster=args.cluster_loss, **vars(args))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.update_momentum(0.99)

    warmup, steps = (3, 20) if dev.type == "cuda" else (1, 5)
    dt = seconds_per_call(step, warmup, steps, dev, "steps")

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
    df = seconds_per_call(embed, warmup, steps, dev, "feature pass")

    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch} width {args.width} {args.img_size}px on {name} (amp {args.amp if dev.type == 'cuda' else 'off'}):")
    print(f"  training step, batch {B}: {dt * 1000:.0f} ms/step, {B / dt:.1f} images/s")
    print(f"  feature pass, batch {F_B}: {df * 1000:.0f} ms/batch, {F_B / df:.1f} images/s; "
          f"a pass costs {(df / F_B) / (dt / B):.3f} of a training epoch on the same images")


if __name__ == "__main__":
    main()
