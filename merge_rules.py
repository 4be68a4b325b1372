"""
What this project adds to the paper's mixture: two merge rules that need no lambda, the
vMF likelihood they test with, and birth (split) moves. None of it is in the paper, which
merges by eq. 11 alone (cluster.merge_pairs_eq11, the default); --merge-rule bic|views and
--births select these.

    log_bessel_iv       log I_v(x) of eq. 4, by Debye's expansion (scipy underflows)
    vmf_loglik          a cluster's maximised log-likelihood from its n_k and rbar_k (eq. 3, 4, 7)
    bic_loss            BIC's verdict on merging two clusters, below 0 to merge
    merge_pairs_bic     --merge-rule bic: merge when one vMF explains two clusters as well
    merge_pairs_views   --merge-rule views: bic, or centroids closer than two views of one image
    birth_seeds         --births: new centroids at the samples the mixture explains worst

Where each rule stops K, and why eq. 11 stays the default: bench/RESULTS.md, "Where K stops".

Adding your own merge rule. A rule is a function

    def merge_pairs_mine(mixture, my_setting=1.0, neighbours=5, **_):
        ...
        return rows, cols, order, info

called at the end of every epoch, on rank 0 (train.merge_step). mixture: the
cluster.VMFMixture of this epoch's fit, on the CPU (centroids K x D float32 unit rows,
counts n_k int64, kappa_k, and rbar_k float64, the mean resultant length of eq. 7).
Keywords: every train.py flag by its name (merge_lambda, births, ...) and view_distance, the
epoch's mean 1 - k1.k2 of two views of one image; take the ones you name and swallow the
rest with **_. Return candidate pairs as numpy arrays rows, cols (int64, j < k), order
(float: the lowest merges first) and info, a dict of numbers for the training log.
VMFMixture.merge does the rest (the greedy matching: each cluster in at most one merge per
epoch, never below --min-clusters; the merged centroid, count, kappa and rbar), and
train.merge_step sends rank 0's mixture to the other ranks. Put the function here and
register it at the bottom of this file,

    MERGE_RULES["mine"] = merge_pairs_mine

and `train.py --merge-rule mine` runs it (train.py's choices are the keys of MERGE_RULES;
cluster.py imports this module at its end, so the table is full for whoever imports cluster).
A rule needs a new flag? Add it to train.py's parser: the rule receives it by its name.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

import search
from cluster import MERGE_RULES, kappa_mle, merged_rbar, nearest_centroid
from utils import distributed, gather_rows


# ----------------------------------------------------------------------------- the vMF likelihood
def log_bessel_iv(v, x):
    """log I_v(x), the modified Bessel function of the first kind in eq. 4, for the orders of
    embeddings (v = D/2 - 1 >= 3): Debye's uniform asymptotic expansion (Abramowitz and
    Stegun 9.7.7) with its first correction term, error O(1/v^2). scipy's ive underflows to
    0 here (I_127(0.1) ~ 1e-330)."""
    z = x / v
    sq = torch.sqrt(1 + z * z)
    t = 1 / sq
    u1 = t * (3 - 5 * t * t) / 24
    return v * (sq + torch.log(z / (1 + sq))) - 0.5 * math.log(2 * math.pi * v) - 0.5 * torch.log(sq) + torch.log1p(u1 / v)


def vmf_loglik(n, rbar, d):
    """The log-likelihood of n unit vectors with mean resultant length rbar under the one vMF
    that fits them best: mu at their mean direction (eq. 6), kappa at eq. 7, so
        sum_i log f(z_i) = n (log C_d(kappa) + kappa rbar)          (eq. 3, 4),
    log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log 2 pi - log I_(d/2-1)(kappa)."""
    rbar = rbar.clamp(1e-3, 1 - 1e-6)
    kappa = kappa_mle(rbar, d)
    log_c = (d / 2 - 1) * torch.log(kappa) - d / 2 * math.log(2 * math.pi) - log_bessel_iv(d / 2 - 1, kappa)
    return n * (log_c + kappa * rbar)


# ----------------------------------------------------------------------------- the merge rules
def bic_loss(mixture, rows, cols, d):
    """For candidate pairs (rows, cols) at distance d, the Bayesian information criterion's
    verdict on merging clusters j and k (Schwarz 1978), below 0 to merge:

        2 [LL_j + LL_k - LL_jk]  -  (2 / pi) n_jk (1 + sqrt(d' / n_jk))^2  -  (d' + 1) log N

    LL is a cluster's maximised log-likelihood (vmf_loglik, from its n and rbar: the M-step's
    sums), d' + 1 the parameters a component adds (its mean direction on the sphere, d' - 1;
    kappa; its weight pi), d' the dimension kappa is estimated in (eq. 16's d', or D for eq. 7).

    The middle term is what a hard split gains on ONE component. k-means cuts a component
    through its mean along its widest axis; each half's mean moves off-axis by sigma sqrt(2/pi),
    which raises the likelihood by about n / pi whatever kappa and D are (n kappa, the slope of
    LL in rbar, times the rbar gained, 1 / (pi kappa)). The widest of d' sample axes is wider by
    (1 + sqrt(d'/n))^2 (the top eigenvalue of a sample covariance). Without it the gain of a
    split grows as n while BIC's price grows as log N, and a cluster of more than ~1.5 d' log N
    samples cut in two is never merged back (the same bias makes classification-likelihood
    BIC over-split; G-means, Hamerly and Elkan 2003, tests a split against one Gaussian the
    same way)."""
    dim = mixture.pca_dim if mixture.kappa_estimator == "pca" else mixture.dim
    n, rbar = mixture.counts.double(), mixture.rbar.double()
    j, k = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    nj, nk = n[j], n[k]
    joint = merged_rbar(nj, rbar[j], nk, rbar[k], torch.from_numpy(1 - d).double())

    def ll(m, rb):
        # rbar of m samples overstates the component's: E||r||^2 = m + m (m - 1) rho^2 for
        # rho = E[mu.z], so (m rbar^2 - 1) / (m - 1) estimates rho^2 without bias (else a
        # singleton, rbar = 1, is a component of infinite likelihood that nothing merges with)
        rho = ((m * rb ** 2 - 1).clamp(min=0) / (m - 1).clamp(min=1)).sqrt()
        return vmf_loglik(m, rho, dim)
    gain = 2 * (ll(nj, rbar[j]) + ll(nk, rbar[k]) - ll(nj + nk, joint))
    split = 2 / math.pi * (nj + nk) * (1 + (dim / (nj + nk)).sqrt()) ** 2
    return (gain - split - (dim + 1) * math.log(float(n.sum()))).numpy()


def bic_candidates(mixture, neighbours=5):
    """Each centroid's `neighbours` nearest centroids as candidate pairs (rows, cols, d) and
    their bic_loss scores."""
    rows, cols, d = search.close_pairs(mixture.centroids.numpy(), 2.5, neighbours, seed=mixture.seed,
                                       device=mixture.device)
    return rows, cols, d, bic_loss(mixture, rows, cols, d)


def merge_pairs_bic(mixture, neighbours=5, **_):
    """The mixture model's own test: merge clusters j and k when one vMF component explains
    their samples as well as two (bic_loss < 0). Candidates are each centroid's `neighbours`
    nearest centroids; the pairs that lose the least likelihood merge first. On fixed
    features of known K it ends at K (bench/bench_kstop.py); in training it keeps more
    clusters than classes, since the cluster loss makes every cluster compact (eq. 9)."""
    rows, cols, _, score = bic_candidates(mixture, neighbours)
    ok = score < 0
    return rows[ok], cols[ok], score[ok], {"merge_candidates": int(ok.sum())}


def merge_pairs_views(mixture, view_distance=0.0, neighbours=5, **_):
    """merge_pairs_bic, and every pair of clusters whose centroids lie closer together than
    two augmented views of one image (d_jk = 1 - mu_j.mu_k < view_distance, the epoch's mean
    1 - k1.k2 of the momentum embeddings of an image's two views; train.py measures it). The
    augmentations define what the model is taught to treat as one image, so clusters closer
    than that are not distinct to it, however compact the cluster loss has made them. The
    spread of the views shrinks as training goes on, so K may have to grow back: the rule is
    meant with birth moves (birth_seeds). Closest pairs merge first."""
    rows, cols, d, score = bic_candidates(mixture, neighbours)
    ok = (score < 0) | (d < view_distance)
    return rows[ok], cols[ok], d[ok], {"merge_candidates": int(ok.sum()), "view_distance": view_distance}


# ----------------------------------------------------------------------------- birth (split) moves
def birth_seeds(feats, index, centroids, m, device=None):
    """Birth moves (--births; VMFMixture.fit calls this before its warm-started Lloyd
    iterations): the m features of all ranks farthest from their nearest centroid (the samples
    the mixture explains worst; k-means++ seeds where the distance is largest), as new
    centroids on the centroids' device. Each rank proposes its own m worst, every rank
    receives all proposals (utils.gather_rows) and picks the same m, ties broken by dataset
    index. The next Lloyd iterations give them members; the merge rule removes those that are
    not distinct clusters. ImageNet: m x D per rank sent, one search per epoch more.
    feats, index: this rank's features (on the mixture's feature device) and their dataset
    indices (CPU); device: where the search runs."""
    world = dist.get_world_size() if distributed() else 1
    rank = dist.get_rank() if distributed() else 0
    dim = feats.shape[1]
    sims, _ = nearest_centroid(feats, centroids, device)
    mine = np.argsort(sims, kind="stable")[:m]
    cand = torch.zeros(m, dim + 2, dtype=torch.float64)                 # feature, cosine, index
    cand[:, dim] = 2.0                                                 # an empty slot is never chosen
    cand[:len(mine), :dim] = feats[torch.from_numpy(mine).to(feats.device)].double().cpu()
    cand[:len(mine), dim] = torch.from_numpy(sims[mine]).double()
    cand[:len(mine), dim + 1] = index[mine].double()
    every = gather_rows(cand, torch.arange(rank * m, rank * m + m), world * m)
    pick = np.lexsort((every[:, dim + 1].numpy(), every[:, dim].numpy()))[:m]
    pick = pick[every[pick, dim].numpy() < 2.0]
    return torch.nn.functional.normalize(every[pick, :dim].float(), dim=1).to(centroids.device)


# ----------------------------------------------------------------------------- the registry
# cluster.py's table holds the paper's eq. 11; these join it (and yours, the same way).
MERGE_RULES["bic"] = merge_pairs_bic
MERGE_RULES["views"] = merge_pairs_views
