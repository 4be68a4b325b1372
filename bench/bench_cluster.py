"""Benchmark of cluster.py on this machine:

0. The E-step's search (--search-n > 0): each of N_local features' nearest centroid (eq. 8)
   and s = 3 nearest (eq. 10's table) among K, on --device, checked against the CPU's search
   on 4,096 of the queries (ImageNet per rank: N_local = 1,281,167 / 8 = 160,146, K = 100,000,
   D = 256; target <= 0.4 s on one GPU).
1. Merging (eq. 11, sec. 4.2) at K = 100,000 centroids, D = 256: E[d] and sigma[d] from sums,
   candidate pairs, greedy matching, the merge itself. Target: under 1 s on a 2-core CPU.
2. The E/M step at N = 200,000, D = 256, K = 10,000: one warm-started E/M iteration (sec. 4.3)
   against PCL-style re-initialisation (fresh random init, nredo = 5 restarts of up to
   init_iters Lloyd iterations, keep the best; Table 7 / Fig. 7), and their ratio.

    python bench/bench_cluster.py                 # both, at the sizes above (the E/M part is long on a CPU)
    python bench/bench_cluster.py --skip-em       # merging only (a few seconds)
    python bench/bench_cluster.py --device cuda --search-n 160146 --k 100000   # on a GPU: the E-step,
                                                  # merging, fit (faiss-gpu, else torch's exact search)

Wall-clock and process CPU time are both printed, with the load average: on a shared machine
the wall time also counts the other processes, and multi-threaded small operations can be
slower than single-threaded ones there, so merging is timed with 1 thread and the default.
The synthetic data stand in for features / centroids; the timings do not depend on them
except through how many merges happen and how many Lloyd iterations a fresh start needs.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster  # noqa: E402
import search  # noqa: E402
from cluster import VMFMixture  # noqa: E402

faiss = search.faiss_module()   # optional (search.py): None where it is not installed


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if faiss is None:
        fs = "faiss not installed (torch searches)"
    else:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        fs = (f"faiss {faiss.__version__} ({'GPU build' if hasattr(faiss, 'StandardGpuResources') else 'CPU build'}, "
              f"{gpus} GPU(s) seen), {faiss.omp_get_max_threads()} faiss threads")
    gpu = f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}{gpu} | os.cpu_count() = {os.cpu_count()}, usable cores = {len(os.sched_getaffinity(0))}, "
            f"torch threads = {torch.get_num_threads()} | torch {torch.__version__} (CUDA {torch.version.cuda}), {fs} | "
            f"numpy {np.__version__}, python {platform.python_version()}")


def load():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def clustered_centroids(K, D, classes, seed):
    """K unit centroids around `classes` random directions (cos ~0.5 within a class, ~0 across),
    like the centroids of an over-segmenting k-means on features of a `classes`-class data set."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, D, generator=g), dim=1)
    lab = torch.randint(classes, (K,), generator=g)
    return F.normalize(means[lab] + torch.randn(K, D, generator=g) / D ** 0.5, dim=1)


def set_threads(n):
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(n)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_search(N, K, D, device, seed=0):
    """Section 0: the E-step's searches at N x K x D on `device`, against the CPU's."""
    X, _ = features(N, D, 1000, seed)
    C = X[torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1))[:K]].contiguous()
    Xn, Cn = X.numpy(), C.numpy()
    cluster.nearest_centroid(Xn[:4096], Cn, device)                 # warm-up: cuBLAS, allocator, Faiss resources
    times = {}
    for s in (1, 3):
        walls = []
        for _ in range(3):
            sync(device)
            with Clock() as t:
                sims, ids = search.knn_search(Xn, Cn, s, device)
                sync(device)
            walls.append(t.wall)
        times[s] = statistics.median(walls)
        if s == 1:
            s1, i1 = sims[:, 0], ids[:, 0]
    s_cpu, i_cpu = cluster.nearest_centroid(Xn[:4096], Cn, "cpu")
    agree, gap = float((i1[:4096] == i_cpu).mean()), float(np.abs(s1[:4096] - s_cpu).max())
    mix = VMFMixture(D, K, kappa_estimator="pca", pca_dim=min(150, D), seed=seed, device=device)
    mix.centroids, mix.counts, mix.kappa = C.clone(), torch.ones(K, dtype=torch.long), torch.ones(K)
    with Clock() as t_assign:
        mix.assignment_table(X, torch.arange(N), N, 3, 0.1, False, device)
        sync(device)
    tflop = 2 * N * K * D / 1e12
    print(f"\n0. E-step search on {device} ({search.search_backend(device)}), N = {N:,} x K = {K:,} x D = {D} "
          f"({tflop:.1f} TFLOP a search)")
    print(f"nearest centroid (eq. 8): {times[1]:.3f} s ({tflop / times[1]:.1f} TFLOP/s) | s = 3 nearest: {times[3]:.3f} s "
          f"| eq. 10 table (search + weights + gather): {t_assign.wall:.3f} s")
    print(f"against the CPU's search ({search.search_backend('cpu')}) on 4,096 queries: the same centroid for "
          f"{100 * agree:.3f}%, largest cosine gap {gap:.1e}")
    return {"n": N, "k": K, "dim": D, "device": str(device), "backend": search.search_backend(device),
            "search_k1_s": times[1], "search_k3_s": times[3], "assignment_table_s": t_assign.wall,
            "tflops": tflop / times[1], "agree_with_cpu": agree, "max_cos_gap": gap}


def bench_merge(K, D, lam, repeats, thread_counts, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = {"clustered (1000 classes)": clustered_centroids(K, D, 1000, seed),
             "uniform on the sphere": F.normalize(torch.randn(K, D, generator=g), dim=1)}
    counts = torch.randint(1, 30, (K,), generator=g)
    kappa = 1 + torch.rand(K, generator=g)
    rbar = 0.3 + 0.5 * torch.rand(K, generator=g, dtype=torch.float64)   # the M-step's, kept for merges
    rows = []
    default = torch.get_num_threads()
    for threads in thread_counts:
        set_threads(threads)
        for name, C in cases.items():
            def fresh():
                m = VMFMixture(D, K, kappa_estimator="banerjee", seed=seed, device=device)
                m.centroids, m.counts, m.kappa, m.rbar = C.clone(), counts.clone(), kappa.clone(), rbar.clone()
                return m
            # one run stage by stage (the calls merge() makes) ...
            m = fresh()
            with Clock() as t_mom:
                mean_d, std_d = cluster.distance_moments(m.centroids)
            thresh = mean_d - lam * std_d
            with Clock() as t_pairs:
                r, c, d = search.close_pairs(m.centroids.numpy(), thresh, seed=seed, device=device)
                sync(device)
            with Clock() as t_match:
                cluster.greedy_matching(r, c, d, K, max_pairs=K - 1)
            # ... then merge() end to end, best and median of `repeats`
            walls, cpus = [], []
            for _ in tqdm(range(repeats), desc=f"merge, {name}, {threads} thread(s)", leave=False):
                m = fresh()
                with Clock() as t:
                    merged, _ = m.merge(merge_lambda=lam)
                    sync(device)
                walls.append(t.wall), cpus.append(t.cpu)
            rows.append((name, threads, t_mom, t_pairs, t_match, walls, cpus, len(r), merged, m.centroids.shape[0],
                         mean_d, std_d, thresh))
    set_threads(default)

    how = "exact kNN" if K <= search.EXACT_MAX or device.type == "cuda" or faiss is None else "k-means cells"
    print(f"\n1. Merging on {device}, K = {K:,}, D = {D}, lambda = {lam} ({how} candidate search) | {load()}")
    head = (f"{'centroids':25s} {'thr':>3s} {'moments':>8s} {'pairs':>7s} {'match':>6s} | {'merge() best':>12s} {'median':>7s} "
            f"{'cpu':>6s} | {'cands':>8s} {'merged':>7s} {'K after':>8s} | E[d]   sigma  thresh")
    print(head)
    print("-" * len(head))
    for name, threads, t_mom, t_pairs, t_match, walls, cpus, ncand, merged, k_after, mean_d, std_d, thresh in rows:
        print(f"{name:25s} {threads:3d} {t_mom.wall:7.3f}s {t_pairs.wall:6.3f}s {t_match.wall:5.3f}s | {min(walls):11.3f}s "
              f"{statistics.median(walls):6.3f}s {statistics.median(cpus):5.2f}s | {ncand:8,d} {merged:7,d} {k_after:8,d} | "
              f"{mean_d:.4f} {std_d:.4f} {thresh:.4f}")
    print("(moments / pairs / match: wall seconds of one run of each stage; merge(): wall over the runs;"
          " cpu: process CPU seconds of the median run, all threads)")
    best = min(rows, key=lambda row: min(row[5]))
    verdict = "met" if max(min(row[5]) for row in rows if row[1] == best[1]) < 1 else "NOT met"
    print(f"target merge() < 1 s at K = 100,000 (here K = {K:,}): {verdict} here (best runs with {best[1]} thread(s): "
          + ", ".join(f"{min(row[5]):.2f}s" for row in rows if row[1] == best[1]) + f") | {load()}")
    return {"k": K, "dim": D, "device": str(device), "how": how,
            "cases": [{"centroids": r[0], "threads": r[1], "best_s": min(r[5]), "median_s": statistics.median(r[5]),
                       "candidates": r[7], "merged": r[8], "k_after": r[9]} for r in rows]}


class EStepCounter:
    """Counts (and shows with tqdm) the E-steps fit() makes, by wrapping VMFMixture._sums."""

    def __init__(self):
        self.n, self.bar, self._orig = 0, None, VMFMixture._sums

    def __enter__(self):
        counter = self

        def stats(mix, feats, centroids):
            out = counter._orig(mix, feats, centroids)
            counter.n += 1
            if counter.bar is not None:
                counter.bar.update(1)
                counter.bar.set_postfix(objective=f"{out[2] / feats.shape[0]:.4f}")
            return out
        VMFMixture._sums = stats
        return self

    def __exit__(self, *exc):
        VMFMixture._sums = self._orig


def features(N, D, classes, seed):
    """N unit features from `classes` directions with per-class spread (stand-in for an epoch's
    momentum features), and the next epoch's features: the same, slightly moved."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, D, generator=g), dim=1)
    lab = torch.randint(classes, (N,), generator=g)
    X = F.normalize(means[lab] + 1.5 * torch.randn(N, D, generator=g) / D ** 0.5, dim=1)
    X2 = F.normalize(X + 0.3 * torch.randn(N, D, generator=g) / D ** 0.5, dim=1)
    return X, X2


def bench_em(N, D, K, nredo, init_iters, warm_iters, no_early_stop, device, seed=0):
    X, X2 = features(N, D, 1000, seed)
    idx = torch.arange(N)
    print(f"\n2. E/M step on {device}, N = {N:,}, D = {D}, K = {K:,}: PCL-style re-initialisation (nredo = {nredo}, "
          f"up to {init_iters} Lloyd iterations each) vs one warm-started iteration")
    pcl = VMFMixture(D, K, kappa_estimator="pca", init_iters=init_iters, reinit_centroids=True, nredo=nredo, seed=seed,
                     device=device)
    if no_early_stop:
        pcl.tol = -float("inf")                              # PCL's Faiss k-means: always init_iters iterations
    with EStepCounter() as es, tqdm(total=nredo * (init_iters + 1), desc="PCL re-init (E-steps, at most)") as bar:
        es.bar = bar
        with Clock() as t_pcl:
            pcl.fit(X, idx, N)
            sync(device)
    pcl_steps = es.n
    # next epoch: warm start from the centroids the previous epoch ended with (sec. 4.3)
    warm = VMFMixture(D, K, kappa_estimator="pca", kmeans_iters=warm_iters, seed=seed, device=device)
    warm.load_state_dict(pcl.state_dict())
    with EStepCounter() as es, tqdm(total=warm_iters + 1, desc=f"warm start, {warm_iters} iteration(s)") as bar:
        es.bar = bar
        with Clock() as t_warm:
            warm.fit(X2, idx, N)
            sync(device)
    warm_steps = es.n
    # the same re-initialisation on the next epoch's features would cost the same again
    print(f"{'':32s} {'wall':>9s} {'cpu':>9s} {'E-steps':>8s} {'s / E-step':>11s} {'objective':>10s} {'K':>7s}")
    for name, t, steps, m in (("PCL re-init (nredo %d)" % nredo, t_pcl, pcl_steps, pcl),
                              ("warm start (%d iteration)" % warm_iters, t_warm, warm_steps, warm)):
        print(f"{name:32s} {t.wall:8.1f}s {t.cpu:8.1f}s {steps:8d} {t.wall / steps:10.2f}s {m.objective:10.4f} {m.centroids.shape[0]:7,d}")
    print(f"ratio PCL re-init / warm start: {t_pcl.wall / t_warm.wall:.1f}x wall, {t_pcl.cpu / t_warm.cpu:.1f}x cpu, "
          f"{pcl_steps / warm_steps:.1f}x E-steps | {load()}")
    result = {"n": N, "k": K, "dim": D, "device": str(device), "reinit_s": t_pcl.wall, "reinit_esteps": pcl_steps,
              "warm_s": t_warm.wall, "warm_esteps": warm_steps}
    full = nredo * (init_iters + 1)
    if pcl_steps < full:
        est = t_pcl.wall / pcl_steps * full
        print(f"cluster.py stops a restart early once the mean cosine gains < tol = {pcl.tol:g}; PCL's own Faiss k-means "
              f"always runs {init_iters} iterations: {full} E-steps, ~{est:.1f}s, ~{est / t_warm.wall:.0f}x the warm start "
              f"(extrapolated from s / E-step; measure it with --no-early-stop)")
    print("(a warm-started fit with 1 iteration makes 2 E-steps: E, M, then the E-step whose counts and"
          " sums give n_k and kappa; the k-means of each restart makes iterations + 1)")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--merge-k", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--merge-lambda", type=float, default=2.0, help="lambda of eq. 11 (train.py's ImageNet presets)")
    p.add_argument("--repeats", type=int, default=3, help="merge() runs per case")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--nredo", type=int, default=5)
    p.add_argument("--init-iters", type=int, default=20, help="Lloyd iterations per restart (cluster.py's and PCL's 20)")
    p.add_argument("--warm-iters", type=int, default=1)
    p.add_argument("--no-early-stop", action="store_true", help="re-init restarts run all init_iters iterations, as PCL's Faiss k-means")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and faiss threads (0: their default; merging is then timed with 1 thread and the default)")
    p.add_argument("--device", default="cpu", help="where the mixture's searches run (cuda: the GPU E-step and merging)")
    p.add_argument("--search-n", type=int, default=0, help="section 0: features searched against --k centroids (0 = skip)")
    p.add_argument("--json", help="also write the figures to this JSON file (bench/device_check.sh reads it)")
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--skip-em", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cluster.py: no CUDA device here (pass --device cpu)")
    if args.threads:
        set_threads(args.threads)
    print("machine:", machine())
    print("before:", load())
    out = {"machine": machine()}
    if args.search_n:
        out["search"] = bench_search(args.search_n, args.k, args.dim, device)
    if not args.skip_merge:
        threads = [args.threads] if args.threads else sorted({1, torch.get_num_threads()})
        out["merge"] = bench_merge(args.merge_k, args.dim, args.merge_lambda, args.repeats, threads, device)
    if not args.skip_em:
        out["em"] = bench_em(args.n, args.dim, args.k, args.nredo, args.init_iters, args.warm_iters, args.no_early_stop,
                             device)
    print("\nafter:", load())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
