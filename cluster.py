"""
The mixture model of SiamMM: a von Mises-Fisher (vMF) mixture over the unit-norm momentum
features z_i, refit once per epoch (sec. 4, 5.1). The equations first, one function each,
then the mixture that runs them:

    nearest_centroid      eq. 8    hard E-step: gamma_ik = 1 for the nearest centroid
    cluster_sums          eq. 5    r_k = sum_i gamma_ik z_i,  n_k = sum_i gamma_ik
    mean_directions       eq. 6    mu_k = r_k / ||r_k||
    kappa_mle             eq. 7    kappa_k = rbar_k (D - rbar_k^2) / (1 - rbar_k^2)
    kappa_pca             eq. 16   eq. 7 in the top d' principal directions
    assignment_weights    eq. 10   soft weights over each sample's s nearest centroids
    merge_pairs_eq11      eq. 11   merge j, k if d_jk < E[d] - lambda sigma[d] (sec. 4.2)
    VMFMixture.fit                 spherical k-means warm-started from last epoch (sec. 4.3):
                                   E-steps (eq. 8) and M-steps (eq. 5, 6), then kappa (7 / 16)
    VMFMixture.merge               merges the pairs a rule in MERGE_RULES picks

merge_rules.py holds what this project adds beyond the paper, and shows how to add a rule:
the bic and views merge rules (registered into MERGE_RULES beside eq11) and birth (split)
moves (--births, which fit calls).

No merge rule is free of a choice. Eq. 11's lambda is tuned per data set (sec. 5.1) and
over-merges as the true K grows; the BIC rule needs none and finds the K of fixed features
of known K (bench/bench_kstop.py), but in training the cluster loss (eq. 9) makes every
cluster compact and the test keeps far more clusters than classes. bench/RESULTS.md,
"Where K stops", has the numbers; eq. 11 stays the default.

The vMF density on the unit sphere in D dimensions and the mixture (sec. 3.3):
    Eq. 2:  p(z) = sum_k pi_k f(z | mu_k, kappa_k), pi_k the prior of cluster k;
    Eq. 3:  f(z | mu, kappa) = C_D(kappa) exp(kappa mu.z);
    Eq. 4:  C_D(kappa) = kappa^(D/2 - 1) / ((2 pi)^(D/2) I_(D/2 - 1)(kappa)).
Training never evaluates C_D: eq. 9's log-likelihood is taken with mu and kappa fixed, so
log C_D(kappa_k) is a constant in the prediction q and drops (loss.cluster_loss), and the
M-step estimates kappa from the mean resultant length (eq. 7) instead of through C_D. Only
the BIC merge rule needs it (merge_rules.vmf_loglik).

Scale (ImageNet: N = 1.28M, D = 256, K0 = 100,000, 8 GPUs) shapes the code:
- Under torch.distributed every rank passes only its own shard of features. Every M-step
  quantity is a sum over samples (r_k, n_k, the D x D second moment for PCA, the objective),
  so ranks all-reduce K x D or D x D tensors and no rank ever holds the N x D matrix.
  With no process group the same code runs on one process.
- The nearest-centroid searches run where the training runs (search.knn_search): on a GPU,
  160k x 100k x 256 per rank is a fraction of a second; on one CPU thread about 87 s. A fit
  moves the features once, to where the search reads them (feature_device), and keeps them
  there, in float32, for every E- and M-step: no copy per Lloyd iteration.
- Merging never forms the K x K distance matrix: E[d] and sigma[d] come from sums over the
  centroids (distance_moments) and candidate pairs from a nearest-neighbour search among
  the centroids (search.close_pairs).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

import search
from utils import all_reduce, gather_rows


# ----------------------------------------------------------------------------- the E and M steps
def feature_device(device):
    """Where a fit keeps the features: where search.knn_search reads them in place. torch's
    exact search (on a GPU without faiss-gpu, or anywhere without Faiss) reads tensors on its
    device; Faiss's indexes, faiss-gpu's GPU index too, read host arrays."""
    device = torch.device(device or "cpu")
    return device if device.type == "cuda" and not search.faiss_has_gpu() else torch.device("cpu")


def searchable(x):
    """x as search.knn_search reads it, without a copy: a CPU tensor as a numpy view of it, a
    tensor on a GPU as itself (torch's search runs there), anything else as a numpy array."""
    if not torch.is_tensor(x):
        return np.asarray(x)
    return x.numpy() if x.device.type == "cpu" else x


def nearest_centroid(feats, centroids, device=None):
    """Eq. 8: the hard E-step, gamma_ik = 1 for the centroid nearest to z_i by cosine (the
    largest mu_k.z_i), 0 for every other k. feats, centroids: numpy arrays or tensors (see
    searchable). Returns (cosine to it, its id), numpy arrays (knn_search's answer)."""
    sims, ids = search.knn_search(searchable(feats), searchable(centroids), 1, device)
    return sims[:, 0], ids[:, 0]


def cluster_sums(feats, ids, K):
    """Eq. 5: the M-step's sufficient statistics under a hard assignment,
        r_k = sum_i gamma_ik z_i  (K x D, float64),   n_k = sum_i gamma_ik  (K,),
    on the features' device, summed over every rank's shard (all-reduce), so each sample
    counts exactly once. On the CPU index_add_ adds the rows in sample order; on a GPU its
    atomic adds come in no fixed order, so there index_put_ accumulates instead (it sorts by
    cluster and adds in a fixed order): the same sums every run."""
    ids = torch.as_tensor(ids).long().to(feats.device)
    r = torch.zeros(K, feats.shape[1], dtype=torch.float64, device=feats.device)
    if feats.device.type == "cpu":
        r.index_add_(0, ids, feats.double())
    else:
        r.index_put_((ids,), feats.double(), accumulate=True)
    n = torch.bincount(ids, minlength=K).double()
    return all_reduce(r), all_reduce(n)


def mean_directions(r, n, centroids):
    """Eq. 6: mu_k = r_k / ||r_k||, the maximum-likelihood mean direction of cluster k. An
    empty cluster keeps its old centroid (it may win samples back in the next E-step)."""
    new = centroids.clone()
    new[n > 0] = torch.nn.functional.normalize(r[n > 0], dim=1).float()
    return new


def kappa_mle(rbar, dim):
    """Eq. 7: kappa = rbar (d - rbar^2) / (1 - rbar^2) (Banerjee et al. 2005), with rbar the
    mean resultant length ||r_k|| / n_k of the cluster and d the dimension of the sphere."""
    return rbar * (dim - rbar ** 2) / (1 - rbar ** 2)


def mean_resultant_length(r, n):
    """rbar_k = ||r_k|| / n_k, clamped below 1: a singleton cluster has rbar = 1 and an
    infinite eq. 7 kappa (VMFMixture._kappa replaces those)."""
    return (r.norm(dim=1) / n).clamp(max=1 - 1e-6)


def principal_directions(feats, n_total, d, device=None):
    """The top d principal directions (D x d) of all features over all ranks, from the
    all-reduced sum and D x D second moment (no rank holds N x D). The product runs on the
    search device: 21 GFLOP in float64 at 160k x 256 per rank, seconds on one CPU thread
    (torchrun's default), milliseconds on a GPU."""
    f = feats.to(device or "cpu").double()
    s1 = all_reduce(f.sum(0)).cpu()
    s2 = all_reduce(f.T @ f).cpu()
    del f
    mean = s1 / n_total
    cov = s2 / n_total - torch.outer(mean, mean)
    # One thread for this D x D eigh: it is tiny, and LAPACK's many short parallel regions
    # made it take 3 s instead of 0.02 s on a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, vecs = torch.linalg.eigh(cov)           # ascending eigenvalues
    finally:
        torch.set_num_threads(threads)
    return vecs[:, -d:]


def kappa_pca(r, n, P):
    """Eq. 16: eq. 7 in the PCA subspace (appendix 10.1). The dimensions of z are
    correlated, so D overstates the sphere's effective dimension. Project each resultant on
    the top d' principal directions P (D x d') and use d' in place of D in eq. 7:
        rbar'_k = ||P^T r_k|| / n_k,   kappa_k = rbar'_k (d' - rbar'_k^2) / (1 - rbar'_k^2)
    (the paper keeps d' = 150 of D = 256)."""
    return kappa_mle(mean_resultant_length(r @ P, n), P.shape[1])


@torch.no_grad()
def assignment_weights(z, centroids, kappa, nbr, tau, log_prior=None):
    """Eq. 10: w_ik = exp(kappa_k mu_k.z_i / tau) / sum_{j in N_i} exp(kappa_j mu_j.z_i / tau).

    z: (B x D) the features the assignment is computed from (this epoch's momentum features);
    nbr: (B x s) ids of N_i, the s nearest centroids. Large tau spreads the weight evenly over
    N_i, small tau puts it on the closest centroid; s = 1 gives w = 1, the hard assignment of
    eq. 8. log_prior (K,), optional, adds log pi_k to the logits: the paper's "measure of the
    size of the cluster" read as the mixing weight instead of kappa.
    """
    logits = kappa[nbr] * torch.einsum("bd,bsd->bs", z, centroids[nbr]) / tau
    if log_prior is not None:
        logits = logits + log_prior[nbr]
    return torch.softmax(logits, dim=1)


# ----------------------------------------------------------------------------- merging (sec. 4.2)
def distance_moments(centroids):
    """Mean and standard deviation of d_jk = 1 - mu_j.mu_k over all pairs j < k, exactly,
    without the K x K matrix (10^10 entries at K = 100,000). With M the K x D matrix of
    unit centroids:
        sum_{j != k} mu_j.mu_k     = ||sum_j mu_j||^2 - K
        sum_{j != k} (mu_j.mu_k)^2 = ||M^T M||_F^2 - K
    and each unordered pair appears twice in the ordered sums."""
    M = centroids
    K = M.shape[0]
    pairs = K * (K - 1)
    # fp32 sum (cascaded, ~1e-7 relative) then double: a K x D float64 copy would cost
    # more than the whole D x D product below at K = 100,000 (0.2 GB of fresh memory)
    s1 = (M.sum(0).double().square().sum() - K) / pairs     # E[cos]
    s2 = ((M.T @ M).double().square().sum() - K) / pairs    # E[cos^2] (D x D product in fp32)
    mean_d = 1 - s1                                         # E[1 - cos]
    var_d = (s2 - s1 ** 2).clamp(min=0)                     # Var[1 - cos] = Var[cos]
    return mean_d.item(), var_d.sqrt().item()


def merge_pairs_eq11(mixture, merge_lambda, neighbours=5, **_):
    """Eq. 11: clusters j and k are a candidate pair if d_jk < E[d] - lambda sigma[d], with
    d_jk = 1 - mu_j.mu_k and E[d], sigma[d] over all pairs j < k (sec. 4.2; lambda is
    --merge-lambda). Only close pairs are looked at: each centroid's `neighbours` nearest
    centroids (search.close_pairs). Returns (rows, cols, d) with d the order in which they
    merge (closest first) and what the log records of the rule."""
    if mixture.centroids.shape[0] < 3:   # one distance: no spread to measure it against
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), {}
    mean_d, std_d = distance_moments(mixture.centroids)
    thresh = mean_d - merge_lambda * std_d
    rows, cols, d = search.close_pairs(mixture.centroids.numpy(), thresh, neighbours, seed=mixture.seed,
                                       device=mixture.device)
    return rows, cols, d, {"merge_threshold": thresh}


def merged_rbar(na, ra, nb, rb, cos):
    """rbar of the union of two clusters, from their sizes, rbar and the cosine of their mean
    directions: ||n_a ra mu_a + n_b rb mu_b|| / (n_a + n_b) (the resultant of eq. 5 adds up).
    VMFMixture.merge keeps rbar with it for the likelihood rules (merge_rules.bic_loss)."""
    r2 = (na * ra) ** 2 + (nb * rb) ** 2 + 2 * na * ra * nb * rb * cos
    return r2.clamp(min=0).sqrt() / (na + nb)


# The merge rules --merge-rule chooses from. A rule is called with the mixture and the run's
# flags (it takes the ones it names) and returns candidate pairs (rows, cols, order: lowest
# merges first) and a dict for the log; VMFMixture.merge does the rest. The paper's eq. 11
# is here; merge_rules.py, imported at the end of this file, registers the project's bic and
# views rules into this table, and its docstring says how to add one of your own.
MERGE_RULES = {"eq11": merge_pairs_eq11}


def greedy_matching(rows, cols, d, n, max_pairs=None):
    """Closest pairs first, each node in at most one pair: the greedy matching over the
    candidate pairs sorted by distance, computed in vectorised rounds. In each round a pair
    is taken when it is the closest remaining pair of both its ends (the greedy order would
    take it: nothing closer touches either end); then every pair touching a taken node is
    dropped. Returns the two index arrays of the chosen pairs, closest first."""
    order = np.argsort(d, kind="stable")
    d_rows, d_cols = rows[order], cols[order]                # rank r = r-th closest pair
    rows, cols, rank = d_rows, d_cols, np.arange(len(order))
    taken = []
    while len(rank):
        best = np.full(n, len(order))
        np.minimum.at(best, rows, rank)
        np.minimum.at(best, cols, rank)
        sel = (best[rows] == rank) & (best[cols] == rank)
        taken.append(rank[sel])
        used = np.zeros(n, dtype=bool)
        used[rows[sel]] = used[cols[sel]] = True
        keep = ~(used[rows] | used[cols])
        rows, cols, rank = rows[keep], cols[keep], rank[keep]
    taken = np.sort(np.concatenate(taken + [np.zeros(0, np.int64)]))[:max_pairs]
    return d_rows[taken], d_cols[taken]


# ----------------------------------------------------------------------------- the mixture
@dataclass
class Assignment:
    """This epoch's E-step as the training step uses it (eq. 9, 10): every cluster's mean
    direction and kappa (normalised for the loss), and each sample's s nearest centroids
    `nbr` with their weights `w`, as N x s tables indexed by dataset index, or a batch's rows
    of them (rows())."""
    centroids: torch.Tensor
    kappa: torch.Tensor
    nbr: torch.Tensor
    w: torch.Tensor

    def rows(self, idx):
        return Assignment(self.centroids, self.kappa, self.nbr[idx], self.w[idx])


class VMFMixture:
    """State: centroids mu (K x D, unit norm), counts n_k, kappa_k, and K per epoch. All of it
    is in state_dict(): what a checkpoint saves and what rank 0 sends the other ranks after
    merging, so state added here travels with it.

    The keywords are the train.py flags they come from. kappa_estimator: "pca" (eq. 16, appendix 10.1),
    "banerjee" (eq. 7), "const" (Table 7's ablation). reinit_centroids: the PCL-style ablation
    (Table 7, Fig. 7): fresh random init every epoch with nredo restarts, keeping the best
    objective, instead of the warm start of sec. 4.3. kappa_clip: see _kappa and
    kappa_for_loss. device: where the nearest-centroid searches run (the training's GPU, or
    the CPU). A fit keeps the features, and the M-step sums (float64, K x D, all-reduced)
    with them, where the search reads them (feature_device): on that GPU for torch's search,
    on the host for Faiss's; the state above is kept on the CPU. births: split moves, beyond
    the paper (merge_rules.birth_seeds).
    """

    def __init__(self, dim, num_clusters, *, kappa_estimator="pca", pca_dim=150, init_iters=20, kmeans_iters=3, tol=1e-4,
                 reinit_centroids=False, nredo=5, kappa_clip=10.0, births=0.0, seed=0, device=None):
        if kappa_estimator not in ("pca", "banerjee", "const"):
            raise ValueError(f"unknown --kappa-estimator {kappa_estimator!r}: pca, banerjee or const")
        self.dim, self.num_clusters = dim, num_clusters
        self.kappa_estimator, self.pca_dim = kappa_estimator, min(pca_dim, dim)
        self.init_iters, self.kmeans_iters, self.tol = init_iters, kmeans_iters, tol
        self.reinit_centroids, self.nredo, self.kappa_clip, self.seed = reinit_centroids, nredo, kappa_clip, seed
        self.births, self.device = births, device
        self.centroids = None                      # K x D float32, unit rows
        self.counts = None                         # K, int64
        self.kappa = None                          # K, float32 (raw estimate)
        self.rbar = None                           # K, float64: mean resultant length (eq. 7's rbar)
        self.objective = float("nan")              # mean cosine of samples to their centroid
        self.k_history = []                        # K after each epoch's fit and merge
        self.n_iter = 0                            # Lloyd iterations of the last fit
        self.fits = 0                              # how many times fit() ran (seeds the inits)
        self.dropped = 0                           # empty clusters dropped by the last fit
        self.born = 0                              # clusters seeded by the last fit (births)

    # ------------------------------------------------------------------ E and M steps (sec. 4.3)
    @torch.no_grad()
    def fit(self, feats, index, n_total):
        """This epoch's E and M steps on this rank's features.

        feats: (n_local x D) unit-norm momentum features; index: (n_local,) their dataset
        indices (distinct over all ranks: no sampler padding); n_total: N over all ranks.
        First call: k-means from a random init (init_iters iterations). Later calls: warm
        start from the previous centroids with kmeans_iters iterations (sec. 4.3), or with
        reinit_centroids, fresh k-means with nredo restarts keeping the best objective (PCL).
        Then drops empty clusters and estimates kappa (eq. 7 / 16). The features move once,
        to where the search reads them (feature_device), as float32, and stay there."""
        feats = feats.to(feature_device(self.device), torch.float32).contiguous()
        index = index.long().cpu()
        self._check(feats, index, n_total)
        if self.centroids is None or self.reinit_centroids:
            centroids, r, n, obj, it = self._restarts(feats, index, n_total)
        else:                                          # warm start from last epoch's centroids
            centroids = self.centroids.to(feats.device)
            if self.births > 0:                        # split moves (merge_rules.birth_seeds)
                centroids = torch.cat([centroids, self._seeds(feats, index, centroids)])
            centroids, r, n, obj, it = self._lloyd(feats, centroids, self.kmeans_iters, n_total)
        self.born = len(centroids) - len(self.centroids) if self.centroids is not None else 0
        self.fits += 1
        centroids, r, n = centroids.cpu(), r.cpu(), n.cpu()   # K x D: the mixture's state lives on the CPU
        keep = n > 0                                   # empty clusters have pi_k = 0: drop them
        self.dropped = int((~keep).sum())              # logged: K also falls this way, not only by merging
        self.centroids, self.counts = centroids[keep].contiguous(), n[keep].long()
        self.objective, self.n_iter = obj / n_total, it
        self.kappa, self.rbar = self._kappa(feats, r[keep], n[keep], n_total)
        return self

    def _lloyd(self, feats, centroids, iters, n_total):
        """Spherical k-means from the given centroids: an E-step, then per iteration the
        M-step's mean directions (eq. 6) and the next E-step. Stops early once the mean cosine
        improves by less than tol. Returns the centroids of the last E-step, its sums r, n and
        objective (so the counts and kappa describe those centroids), and the iterations."""
        prev = -float("inf")
        it = 0
        r, n, obj = self._sums(feats, centroids)
        for it in range(1, iters + 1):
            centroids = mean_directions(r, n, centroids)          # M-step, eq. 6
            r, n, obj = self._sums(feats, centroids)              # E-step, eq. 8 and 5
            if obj / n_total - prev < self.tol:
                break
            prev = obj / n_total
        return centroids, r, n, obj, it

    def _sums(self, feats, centroids):
        """One E-step (eq. 8) on this rank's shard and the all-reduced M-step sums (eq. 5).
        Returns r (K x D, float64) and n (K,) on the features' device, and the sum of every
        sample's cosine to its centroid."""
        sims, ids = nearest_centroid(feats, centroids, self.device)
        r, n = cluster_sums(feats, ids, centroids.shape[0])
        obj = torch.tensor([float(sims.astype(np.float64).sum())], dtype=torch.float64)
        return r, n, all_reduce(obj).item()

    def _restarts(self, feats, index, n_total):
        """k-means from random inits, the best objective of nredo restarts with
        reinit_centroids (one otherwise). K0 clusters the first time; afterwards the current
        K, so that re-initialising (the Table 7 ablation) changes only where the centroids
        start, not what merging has done."""
        k = self.num_clusters if self.centroids is None else self.centroids.shape[0]
        best = None
        for redo in range(self.nredo if self.reinit_centroids else 1):
            init = self._random_init(feats, index, n_total, self.seed + 1000 * self.fits + redo, k)
            out = self._lloyd(feats, init, self.init_iters, n_total)
            if best is None or out[3] > best[3]:
                best = out
        return best

    def _seeds(self, feats, index, centroids):
        """Birth moves, beyond the paper: ceil(births K) new centroids where the mixture fits
        worst (merge_rules.birth_seeds)."""
        return merge_rules.birth_seeds(feats, index, centroids, math.ceil(self.births * len(centroids)), self.device)

    def _random_init(self, feats, index, n_total, seed, k):
        """k features chosen uniformly at random from all N (Faiss's own init). The choice
        depends only on the seed and N, not on how the data is sharded over ranks: every
        rank draws the same global ids and contributes the rows it owns."""
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n_total, generator=g)[:k]
        slot = torch.full((n_total,), -1, dtype=torch.long)
        slot[chosen] = torch.arange(k)
        mine = slot[index].to(feats.device)
        init = torch.zeros(k, self.dim, dtype=torch.float32, device=feats.device)
        init[mine[mine >= 0]] = feats[mine >= 0]
        return all_reduce(init)

    def _check(self, feats, index, n_total):
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features have shape {tuple(feats.shape)}, the mixture expects D = {self.dim}: "
                             "a checkpoint from a model with another --dim?")
        if not torch.isfinite(feats).all():
            raise ValueError("features contain NaN or inf: the encoder has diverged (lower --lr, or resume an earlier checkpoint)")
        if index.shape[0] != feats.shape[0]:
            raise ValueError("index and features differ in length")
        if index.numel() and (index.min() < 0 or index.max() >= n_total):
            raise ValueError(f"sample index {int(index.max() if index.max() >= n_total else index.min())} is outside "
                             f"0..{n_total - 1}: indices must be positions in the data set (N = {n_total})")
        if self.num_clusters > n_total:
            raise ValueError(f"--num-clusters {self.num_clusters} is larger than the number of samples N = {n_total}: "
                             "use fewer clusters")

    # ------------------------------------------------------------------ kappa (eq. 7, 16; sec. 4.4)
    def _kappa(self, feats, r, n, n_total):
        """Per-cluster concentration from the cluster sums r_k, n_k: eq. 16 ("pca"), eq. 7
        ("banerjee") or 1 ("const", Table 7's ablation). Guards: a singleton cluster (rbar = 1,
        kappa = inf) and any non-finite value take the median kappa of the other clusters,
        and no estimate exceeds kappa_clip times the median. Also returns each cluster's mean
        resultant length rbar in the space of the estimate (the top d' principal directions
        for "pca", all D dimensions otherwise), which the likelihood merge rule reads."""
        K = r.shape[0]
        if self.kappa_estimator == "pca":
            P = principal_directions(feats, n_total, self.pca_dim, self.device)
            rbar, kappa = mean_resultant_length(r @ P, n), kappa_pca(r, n, P)
        else:
            rbar = mean_resultant_length(r, n)
            kappa = kappa_mle(rbar, self.dim)
        if self.kappa_estimator == "const":
            return torch.ones(K), rbar
        bad = (n < 2) | ~torch.isfinite(kappa)
        if bad.all():
            return torch.ones(K), rbar
        kappa[bad] = kappa[~bad].median()
        # A few (near-)duplicate images form a tight cluster with rbar ~ 1 - 1e-6 and kappa
        # ~ 1e7; left alone, that one value would set the mean of kappa_for_loss() and scale
        # every other cluster's loss to ~0.
        kappa = kappa.clamp(max=self.kappa_clip * kappa.median())
        return kappa.float(), rbar

    def kappa_for_loss(self):
        """kappa normalised to mean 1 over clusters, so the cluster loss has the same scale
        whatever D and the data, and at most kappa_clip (PCL clips its concentration too):
        with the estimates capped at kappa_clip x their median (_kappa), no cluster weighs
        more than kappa_clip times an average one in eq. 9 and 10."""
        k = self.kappa / self.kappa.mean()
        return k.clamp(max=self.kappa_clip)

    # ------------------------------------------------------------------ assignment (eq. 8, 10)
    @torch.no_grad()
    def assign(self, feats, s=1, tau=0.1, prior=False):
        """Each sample's s nearest centroids N_i (by cosine) and its weights (eq. 10; s = 1
        is the hard assignment of eq. 8). Returns nbr (n x s) int64 and w (n x s) float32."""
        s = min(s, self.centroids.shape[0])
        _, ids = search.knn_search(feats.float().cpu().numpy(), self.centroids.numpy(), s, self.device)
        nbr = torch.from_numpy(ids).long()
        log_prior = torch.log(self.counts.float() / self.counts.sum()) if prior else None
        w = assignment_weights(feats.float().cpu(), self.centroids, self.kappa_for_loss(), nbr, tau, log_prior)
        return nbr, w

    @torch.no_grad()
    def assignment_table(self, feats, index, n_total, s=1, tau=0.1, prior=False, device=None):
        """The epoch's Assignment of every sample on `device`: nbr, w of assign() as N x s
        tables indexed by dataset index, so that the training step looks its batch up by
        index (PCL and ProPos do the same). Each rank assigns its own shard and
        utils.gather_rows fills in the other ranks' rows: any rank can look up any sample of
        its shuffled batch. ImageNet: 1.28M x 3 int64 + float32, 46 MB per rank."""
        nbr, w = self.assign(feats, s, tau, prior)
        return Assignment(self.centroids.to(device), self.kappa_for_loss().to(device),
                          gather_rows(nbr, index, n_total).to(device), gather_rows(w, index, n_total).to(device))

    # ------------------------------------------------------------------ merging (sec. 4.2)
    @torch.no_grad()
    def merge(self, merge_rule="eq11", min_clusters=1, **flags):
        """Merge the candidate pairs that MERGE_RULES[merge_rule] picks (eq. 11 by default;
        flags: the rule's settings, e.g. merge_lambda; train.py passes all its flags). Closest pairs first; each cluster takes part
        in at most one merge per call, so K shrinks gradually; never below min_clusters. The
        merged centroid is the count-weighted mean of the two, renormalised; counts add up;
        kappa is the count-weighted mean until the next fit re-estimates it.
        Returns (number of merges, the rule's log entries)."""
        K = self.centroids.shape[0]
        if K <= min_clusters:
            return 0, {}
        rows, cols, order, info = MERGE_RULES[merge_rule](self, **flags)
        a, b = greedy_matching(rows, cols, order, K, max_pairs=K - min_clusters)
        if len(a) == 0:
            return 0, info
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        na, nb = self.counts[a].float(), self.counts[b].float()
        mu = self.centroids
        # float32, in place on the gathered copies: float64 temporaries of the ~40k x 256
        # merged rows would cost ~0.4 s at K = 100,000
        merged = mu[a].mul_(na[:, None]).add_(mu[b].mul_(nb[:, None]))
        merged = merged.div_(merged.norm(dim=1, keepdim=True).clamp_(min=1e-12))
        kap = (na * self.kappa[a] + nb * self.kappa[b]) / (na + nb).clamp(min=1)
        rbar = merged_rbar(na.double(), self.rbar[a], nb.double(), self.rbar[b], (mu[a] * mu[b]).sum(1).double())
        n_ab = self.counts[a] + self.counts[b]
        # Drop b first (boolean indexing copies), then write the merged a rows into the copies:
        # the old tensors are never written to, so a state_dict() taken before the merge, or
        # the checkpoint dict given to load_state_dict(), keeps its values.
        keep = torch.ones(K, dtype=torch.bool)
        keep[b] = False
        at = keep.cumsum(0)[a] - 1                              # where row a lands after the drop
        self.centroids, self.counts, self.kappa, self.rbar = (self.centroids[keep], self.counts[keep],
                                                              self.kappa[keep], self.rbar[keep])
        self.centroids[at], self.counts[at], self.kappa[at], self.rbar[at] = merged, n_ab, kap, rbar
        return len(a), info

    # ------------------------------------------------------------------ state
    def summary(self):
        """What the training log records every epoch (collapse shows as one giant cluster)."""
        c = self.counts.float()
        return {"K": int(self.centroids.shape[0]), "objective": self.objective, "kmeans_iters": self.n_iter,
                "dropped_empty": self.dropped, "born": self.born,
                "cluster_min": int(c.min()), "cluster_median": float(c.median()), "cluster_max": int(c.max()),
                "kappa_min": float(self.kappa.min()), "kappa_median": float(self.kappa.median()),
                "kappa_max": float(self.kappa.max())}

    def state_dict(self):
        return {"centroids": self.centroids, "counts": self.counts, "kappa": self.kappa, "rbar": self.rbar,
                "objective": self.objective, "k_history": list(self.k_history), "fits": self.fits,
                "dim": self.dim}

    def load_state_dict(self, sd):
        if sd["dim"] != self.dim:
            raise ValueError(f"saved cluster state has D = {sd['dim']}, this model has D = {self.dim}: "
                             "resume with the same --dim")
        self.centroids, self.counts, self.kappa, self.rbar = sd["centroids"], sd["counts"], sd["kappa"], sd["rbar"]
        self.objective, self.k_history, self.fits = sd["objective"], list(sd["k_history"]), sd["fits"]


# The project's additions beyond the paper (the bic and views rules, births) register into
# MERGE_RULES when their module loads: imported last, once every name above exists, so it
# loads whichever of the two modules is imported first.
import merge_rules  # noqa: E402
