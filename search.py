"""
Exact nearest-neighbour search, the one primitive under the E-step (each feature's nearest
centroids), merging (each centroid's nearest centroids), kNN evaluation (each test image's
nearest training images) and the mislabel report (each image's nearest other images).

    knn_search     Faiss (CPU, or GPU with faiss-gpu), or torch on a GPU or without Faiss
    torch_search   blockwise matmul + running top-k: any size, fp16 inputs, leave-one-out
    close_pairs    pairs of centroids closer than a threshold, without the K x K matrix
    knn_votes      the weighted vote of a sample's neighbours (DINO's kNN protocol)

Where it runs matters at ImageNet scale (N = 1.28M, K = 100,000, D = 256, 8 GPUs): one
E-step search of a rank's 160k features against 100k centroids is 8.2 TFLOP, a fraction of
a second on a GPU and about 87 s on one CPU thread (torchrun gives each process one).
"""

import importlib
import math
import sys

import numpy as np
import torch
from tqdm import tqdm

# Up to this many centroids, merging searches all pairs exactly (Faiss kNN); above it, on a
# CPU, within coarse cells (close_pairs). Exact search at K = 8,000 costs about as much as
# the cell search at K = 100,000.
EXACT_MAX = 8000


_FAISS = []   # [the faiss module, or None where it cannot be imported], filled on first use


def faiss_module():
    """Faiss, imported on first use, or None where it is not installed. Faiss is optional:
    faiss-gpu is hard to install (its wheel needs CUDA 12 runtime libraries beside torch's
    CUDA 13), and every search here has an exact torch path (torch_search), which the GPU
    E-step uses anyway without faiss-gpu. Without Faiss the CPU searches run on torch too
    (exact, blockwise; slower at ImageNet's K), and the first search says so in one line."""
    if not _FAISS:
        try:
            _FAISS.append(importlib.import_module("faiss"))
        except ImportError:
            _FAISS.append(None)
            print("note: Faiss is not installed, so nearest-neighbour searches run on torch (exact, blockwise); "
                  "pip install faiss-cpu (or faiss-gpu) for faster CPU k-means and merging", file=sys.stderr)
    return _FAISS[0]


def faiss_has_gpu():
    """True where Faiss was built with GPU support and sees a GPU (faiss-gpu on a GPU machine)."""
    faiss = faiss_module()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss_module().StandardGpuResources()
    return _GPU_RES


def flat_ip_index(dim, device=None):
    """An exact inner-product Faiss index: on the GPU `device` (this process's own, never every
    visible one) when Faiss was built with GPU support, else on the CPU."""
    faiss = faiss_module()
    index = faiss.IndexFlatIP(dim)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and faiss_has_gpu():
        # Faiss allocates outside PyTorch's caching allocator: hand it what PyTorch holds unused
        torch.cuda.empty_cache()
        index = faiss.index_cpu_to_gpu(_gpu_resources(), device.index or 0, index)
    return index


def knn_search(queries, database, k, device=None):
    """Exact inner-product search: for each query row, the k database rows with the largest
    dot product (= cosine similarity for unit vectors). Returns (sims, ids) as numpy arrays.

    device: where the search runs. The CPU (default): Faiss. A CUDA device: Faiss's GPU
    index there when Faiss was built with GPU support (faiss-gpu), else torch on that GPU
    (torch_search). A GPU run never falls back to CPU Faiss: torchrun gives each process one
    thread, and one E-step search at ImageNet scale (160k x 100k x 256 per rank, 8.2 TFLOP)
    takes about 87 s on one CPU thread against well under a second on a GPU. Without Faiss:
    torch on `device`, CPU included."""
    device = torch.device(device or "cpu")
    if faiss_module() is None or (device.type == "cuda" and not faiss_has_gpu()):
        return torch_search(queries, database, k, device)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    db = np.ascontiguousarray(database, dtype=np.float32)
    index = flat_ip_index(db.shape[1], device)
    index.add(db)
    return index.search(q, k)


def search_backend(device):
    """What knn_search runs on `device`, in words (train.py says it at start)."""
    device = torch.device(device or "cpu")
    if faiss_module() is None:
        return f"torch on {device} (Faiss is not installed)"
    if device.type != "cuda":
        return f"Faiss on the CPU ({torch.get_num_threads()} threads)"
    return f"Faiss on {device}" if faiss_has_gpu() else f"torch on {device} (this Faiss has no GPU support)"


def torch_search(queries, database, k, device, budget=2 ** 28, exclude_self=False, normalize=False, desc=None):
    """knn_search with torch, exact, in fp32 with TF32 off (its 10-bit mantissa would blur
    near ties): blocks of database rows, each converted to fp32 on `device` once, times
    chunks of queries, each similarity block at most `budget` floats (1 GiB), with a running
    top-k. The database may be a half-precision tensor (evaluate.py keeps its features so)
    and is never copied whole. exclude_self: the queries are the database's own rows, in
    order, and no row finds itself (a leave-one-out search). normalize: L2-normalise rows
    and queries as they are taken (cosine search over unnormalised features). desc: show a
    progress bar under this name. Returns (sims, ids), numpy."""
    db, q = torch.as_tensor(database), torch.as_tensor(queries)
    nq, ndb = q.shape[0], db.shape[0]
    k = min(k, ndb - 1 if exclude_self else ndb)
    best_v = torch.full((nq, k), -float("inf"), device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=device)
    block = min(max(ndb, 1), 65536)
    chunk = max(1, budget // block)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    bar = tqdm(total=math.ceil(ndb / block) * math.ceil(nq / chunk), desc=desc, leave=False, disable=desc is None)
    try:
        for b0 in range(0, ndb, block):
            rows = db[b0:b0 + block].to(device=device, dtype=torch.float32)
            rows = torch.nn.functional.normalize(rows, dim=1) if normalize else rows
            for s in range(0, nq, chunk):
                qs = q[s:s + chunk].to(device=device, dtype=torch.float32)
                sims = (torch.nn.functional.normalize(qs, dim=1) if normalize else qs) @ rows.T
                if exclude_self:   # query s + i is database row s + i
                    i = torch.arange(s, s + sims.shape[0], device=device)
                    mine = (i >= b0) & (i < b0 + rows.shape[0])
                    sims[mine.nonzero()[:, 0], (i - b0)[mine]] = -float("inf")
                v, j = sims.topk(min(k, sims.shape[1]), dim=1)
                v, pick = torch.cat([best_v[s:s + chunk], v], 1).topk(k, dim=1)
                best_i[s:s + chunk] = torch.cat([best_i[s:s + chunk], j + b0], 1).gather(1, pick)
                best_v[s:s + chunk] = v
                bar.update(1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        bar.close()
    return best_v.cpu().numpy(), best_i.cpu().numpy()


# ----------------------------------------------------------------------------- close pairs of centroids (merging)
def close_pairs(centroids, thresh, neighbours=5, exact_max=EXACT_MAX, seed=0, device=None):
    """Candidate pairs (j < k) of unit centroids with d_jk = 1 - mu_j.mu_k < thresh, as
    numpy arrays (rows, cols, d). Only close pairs matter for eq. 11, so the K x K matrix
    is never formed:
    - K <= exact_max, or a GPU `device`: each centroid's `neighbours` nearest centroids by
      exact search (each cluster merges at most once per call, so a few suffice);
    - larger K on a CPU: exact all-pairs search at K = 100,000 is 2.6e12 flops (tens of
      seconds on 2 cores). Instead a coarse spherical k-means (Faiss) cuts the sphere into
      sqrt(K) cells and pairs are compared inside each cell (~1/sqrt(K) of the work; cells
      of similar size share one batched product, see _pairs_within_cells). A close pair
      split by a cell border is missed this time and found at a later epoch's merge.
      Without Faiss (no coarse k-means) the search stays exact at every K."""
    K, D = centroids.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    faiss = faiss_module()
    if K <= exact_max or torch.device(device or "cpu").type == "cuda" or faiss is None:
        sims, ids = knn_search(c, c, min(neighbours + 1, K), device)
        rows = np.repeat(np.arange(K), ids.shape[1])
        cols, d = ids.reshape(-1), 1 - sims.reshape(-1)
    else:
        ncell = int(math.sqrt(K))
        km = faiss.Kmeans(D, ncell, niter=10, spherical=True, seed=seed, max_points_per_centroid=32)
        km.train(c)
        cell = torch.from_numpy(km.index.search(c, 1)[1][:, 0])
        rows, cols, d = _pairs_within_cells(torch.from_numpy(c), cell, ncell, neighbours)
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    ok = (cols >= 0) & (lo != hi) & (d < thresh)
    # the same pair can come from both of its ends: keep it once
    key = np.unique(lo[ok].astype(np.int64) * K + hi[ok], return_index=True)[1]
    return lo[ok][key], hi[ok][key], d[ok][key]


def _pairs_within_cells(M, cell, ncell, neighbours, batch=8):
    """For each row of M (unit vectors), its `neighbours` most similar rows in the same cell,
    as numpy arrays (rows, cols, d = 1 - cos). Cells of similar size go together through one
    batched matrix product (zero-padded to the largest of the batch) rather than one small
    product per cell: ~300 tiny products and top-k's cost more in per-call thread wake-ups
    than in arithmetic on a small (or busy) CPU. Batches of 8 keep each block in cache."""
    K = M.shape[0]
    size = torch.bincount(cell, minlength=ncell)
    order = torch.argsort(cell, stable=True)               # members of each cell, contiguous
    start = size.cumsum(0) - size
    by_size = torch.argsort(size)                          # batch cells of similar size
    rows, cols, d = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0)]
    for i in range(0, ncell, batch):
        cs = by_size[i:i + batch]
        m = int(size[cs].max())
        if m < 2:
            continue
        slot = torch.arange(m)
        valid = slot < size[cs, None]                      # B x m: a real member, not padding
        mem = torch.where(valid, order[(start[cs, None] + slot).clamp(max=K - 1)], -1)
        X = M[mem.clamp(min=0)] * valid[..., None]
        sim = torch.bmm(X, X.transpose(1, 2))
        sim.masked_fill_(~valid[:, None, :], -3).diagonal(dim1=1, dim2=2).fill_(-3)  # no padding, no self
        s, k = sim.topk(min(neighbours, m - 1), dim=2)
        nbr = mem.gather(1, k.flatten(1)).view_as(k)
        ok = valid[..., None] & (s > -2)                   # real member, real neighbour (cos >= -1)
        rows.append(mem[..., None].expand_as(k)[ok]), cols.append(nbr[ok]), d.append(1 - s[ok])
    return torch.cat(rows).numpy(), torch.cat(cols).numpy(), torch.cat(d).numpy()


# ----------------------------------------------------------------------------- the vote of the neighbours
def knn_votes(sims, nbr_labels, T, num_classes):
    """The weighted kNN vote of DINO's eval_knn.py (Wu et al. 2018 before it): each
    neighbour adds exp(cos / T) to the vote of its class. Returns the votes (n x C, float64).

    Computed as exp((cos - 1) / T), which scales every vote of a row by the same exp(-1 / T)
    (the ranking of the classes is unchanged) and cannot overflow: at T = 0.01, exp(cos / T)
    reaches e^100, beyond float32. sims, nbr_labels: n x k, the neighbours' cosines and labels."""
    w = torch.exp((torch.as_tensor(sims, dtype=torch.float64) - 1) / T)
    votes = torch.zeros(w.shape[0], num_classes, dtype=torch.float64)
    return votes.scatter_add_(1, torch.as_tensor(nbr_labels).long(), w)
