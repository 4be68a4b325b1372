"""
Does this Faiss build work beside this PyTorch build? Run it once on a GPU node after
swapping faiss-cpu for faiss-gpu (requirements.txt says how), before a long run.

    python bench/check_faiss_gpu.py                 # 20,000 queries x 4,096 centroids x 256
    python bench/check_faiss_gpu.py --n 160000 --k 100000   # one ImageNet E-step search per rank

faiss-gpu 1.15.1 is built against the CUDA 12 runtime wheels (libcudart.so.12, libcublas.so.12)
while torch 2.14.1's CUDA build brings CUDA 13 (libcudart.so.13): the two runtimes have
different sonames, so both load into one process, and the driver serves both. This script
shows which runtimes this process loaded, then runs the E-step's search
(cluster.nearest_centroid) every way this machine allows (CPU Faiss; Faiss's GPU index; torch
on the GPU, or on the CPU without one), a torch GPU step after Faiss has used the GPU, and compares the answers with CPU
Faiss's. It exits 1 when the neighbours or similarities differ, 0 otherwise.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster  # noqa: E402
import search  # noqa: E402
import faiss  # noqa: E402


def loaded_cuda_libraries():
    """The CUDA runtime and BLAS libraries mapped into this process (Linux), by file name."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted({os.path.basename(p) for p in paths if os.path.basename(p).startswith(("libcudart", "libcublas.", "libcublasLt"))})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="queries (features of one rank)")
    p.add_argument("--k", type=int, default=4096, help="database rows (centroids)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__} from {os.path.dirname(faiss.__file__)}")
    print(f"GPUs: torch sees {torch.cuda.device_count()}, Faiss's GPU build: "
          f"{'yes' if hasattr(faiss, 'StandardGpuResources') else 'no'}, Faiss sees {faiss.get_num_gpus()}")
    print("CUDA libraries loaded:", ", ".join(loaded_cuda_libraries()) or "none")

    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1).numpy()
    cents = torch.nn.functional.normalize(torch.randn(args.k, args.dim, generator=g), dim=1).numpy()

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"{name:<32} {time.time() - t0:8.3f} s")
        return out

    ref_s, ref_i = timed("CPU Faiss", lambda: cluster.nearest_centroid(feats, cents, "cpu"))
    runs = {}
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if search.faiss_has_gpu():   # nearest_centroid takes Faiss's GPU index by itself here
            runs["Faiss GPU index"] = timed("Faiss GPU index", lambda: cluster.nearest_centroid(feats, cents, dev))
    runs[f"torch search on {dev}"] = timed(f"torch search on {dev}", lambda: search.torch_search(feats, cents, 1, dev))
    if dev.type == "cuda":
        x = torch.randn(1024, 1024, device=dev)   # torch's own CUDA runtime still works after Faiss's
        runs["torch matmul after Faiss"] = timed("torch matmul after Faiss", lambda: (x @ x.T).diagonal()[:1])
    failed = False
    for name, out in runs.items():
        if name.startswith("torch matmul"):
            ok = bool(torch.isfinite(out).all())
            print(f"{name}: {'ok' if ok else 'NOT FINITE'}")
        else:
            s, i = (np.asarray(out[0]).ravel(), np.asarray(out[1]).ravel())
            agree = float((i == ref_i).mean())
            gap = float(np.abs(s - ref_s).max())
            # exact fp32 searches: the same neighbour but for near ties, similarities to float rounding
            ok = agree > 0.999 and gap < 1e-4
            print(f"{name}: same nearest centroid as CPU Faiss for {agree:.4%} of queries, largest similarity gap {gap:.1e}")
        failed |= not ok
    if dev.type != "cuda":
        print("no GPU here: only the libraries' loading and the CPU searches were checked")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
