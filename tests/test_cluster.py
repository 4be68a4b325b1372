"""Tests of cluster.py, the vMF mixture engine: vMF recovery (eq. 5-7, 16), merging
(eq. 11), warm starts (sec. 4.3), DDP against one process.

Data come from a known vMF mixture drawn with Wood's (1994) rejection sampler, so the
estimates can be checked against the truth. Everything runs on the CPU in seconds; the DDP
test starts two gloo processes on localhost.
"""

import io
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cluster  # noqa: E402
import merge_rules  # noqa: E402
import search  # noqa: E402
from cluster import VMFMixture, distance_moments, greedy_matching, kappa_mle  # noqa: E402
from search import close_pairs  # noqa: E402
from conftest import free_port  # noqa: E402


# ---------------------------------------------------------------------------- helpers
def sample_vmf(mu, kappa, n, rng):
    """n draws from vMF(mu, kappa) on the unit sphere in d = len(mu) dimensions (Wood 1994).

    w = mu.z has density proportional to exp(kappa w) (1 - w^2)^((d-3)/2): draw it with
    Wood's rejection scheme (Beta proposal), then z = w mu + sqrt(1 - w^2) v with v uniform
    on the unit sphere of the tangent space at mu."""
    mu = np.asarray(mu, dtype=np.float64)
    d = mu.shape[0]
    b = (-2 * kappa + np.sqrt(4 * kappa ** 2 + (d - 1) ** 2)) / (d - 1)
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + (d - 1) * np.log(1 - x0 ** 2)
    w = np.empty(0)
    while len(w) < n:
        z = rng.beta((d - 1) / 2, (d - 1) / 2, size=2 * n)
        cand = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        u = rng.uniform(size=2 * n)
        accept = kappa * cand + (d - 1) * np.log(1 - x0 * cand) - c >= np.log(u)
        w = np.concatenate([w, cand[accept]])
    w = w[:n]
    v = rng.standard_normal((n, d))
    v -= (v @ mu)[:, None] * mu
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return w[:, None] * mu + np.sqrt(1 - w ** 2)[:, None] * v


def mean_resultant(kappa, d):
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E[mu.z] under vMF(mu, kappa)."""
    return scipy.special.ive(d / 2, kappa) / scipy.special.ive(d / 2 - 1, kappa)


def vmf_mixture(means, kappas, n, seed):
    rng = np.random.default_rng(seed)
    X = np.concatenate([sample_vmf(m, k, n, rng) for m, k in zip(means, kappas)])
    return torch.from_numpy(X).float(), torch.from_numpy(np.repeat(np.arange(len(means)), n))


def unit(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def rot(D, i, j, theta):
    """cos(theta) e_i + sin(theta) e_j: unit vectors at known angles in the (e_i, e_j) plane."""
    v = torch.zeros(D, dtype=torch.float64)
    v[i], v[j] = np.cos(theta), np.sin(theta)
    return v


def brute_moments(M):
    """Mean and (population) std of d_jk = 1 - mu_j.mu_k over all pairs j < k, from the K x K matrix."""
    M = np.asarray(M, dtype=np.float64)
    d = 1 - M @ M.T
    iu = np.triu_indices(len(M), 1)
    return d[iu].mean(), d[iu].std()


def brute_greedy(M, thresh, max_pairs=None):
    """eq. 11 by brute force: all pairs with d < thresh, closest first, each node at most once."""
    M = np.asarray(M, dtype=np.float64)
    d = 1 - M @ M.T
    pairs = sorted((d[j, k], j, k) for j in range(len(M)) for k in range(j + 1, len(M)) if d[j, k] < thresh)
    used, out = set(), []
    for _, j, k in pairs:
        if j not in used and k not in used:
            used |= {j, k}
            out.append((j, k))
    return out[:max_pairs]


def loop_greedy(rows, cols, d, max_pairs=None):
    """Reference for greedy_matching: a plain loop over the pairs in (stable) distance order."""
    used, out = set(), []
    for i in sorted(range(len(d)), key=lambda i: d[i]):
        if rows[i] not in used and cols[i] not in used:
            used |= {rows[i], cols[i]}
            out.append((int(rows[i]), int(cols[i])))
    return out[:max_pairs]


def with_state(D, centroids, counts=None, kappas=None, **kw):
    """A mixture holding the given state, as after a fit (or a load_state_dict)."""
    m = VMFMixture(D, len(centroids), **kw)
    m.centroids = unit(centroids).contiguous()
    K = len(centroids)
    m.counts = torch.as_tensor(counts if counts is not None else [1] * K, dtype=torch.long)
    m.kappa = torch.as_tensor(kappas if kappas is not None else [1.0] * K, dtype=torch.float32)
    m.rbar = torch.full((K,), 0.5, dtype=torch.float64)
    return m


# ---------------------------------------------------------------------------- the sampler itself
def test_wood_sampler_matches_vmf_moments():
    """The sampler is right before anything is measured with it: unit norm, E[mu.z] = A_d(kappa)
    (Bessel ratio, computed independently of Banerjee's approximation), and the tangent
    component has no preferred direction."""
    rng = np.random.default_rng(0)
    d, kappa, n = 16, 40.0, 40000
    mu = rng.standard_normal(d)
    mu /= np.linalg.norm(mu)
    Z = sample_vmf(mu, kappa, n, rng)
    assert np.allclose(np.linalg.norm(Z, axis=1), 1, atol=1e-12)
    w = Z @ mu
    assert abs(w.mean() - mean_resultant(kappa, d)) < 3e-3
    tangent = Z - w[:, None] * mu
    assert np.linalg.norm(tangent.mean(0)) < 0.01


# ---------------------------------------------------------------------------- recovery (eq. 5-7, 16)
D_TRUE, KAPPAS, PER_CLUSTER = 16, [20.0, 35.0, 50.0, 75.0, 100.0], 2000


@pytest.fixture(scope="module")
def mixture_data():
    """Five vMF components in 16 dims with orthonormal (well separated) means, 2000 samples each."""
    rng = np.random.default_rng(0)
    means = np.linalg.qr(rng.standard_normal((D_TRUE, D_TRUE)))[0][: len(KAPPAS)]
    X, labels = vmf_mixture(means, KAPPAS, PER_CLUSTER, seed=1)
    return torch.from_numpy(means).float(), X, labels


def match_components(mix, true_means):
    """Recovered component for each true one by max cosine; (cosines, recovered ids)."""
    cos = true_means @ mix.centroids.T
    best = cos.argmax(1)
    assert len(set(best.tolist())) == len(true_means), "two true components matched the same centroid"
    return cos.max(1).values, best


def test_recover_centroids_and_kappa_mle(mixture_data):
    means, X, _ = mixture_data
    N = len(X)
    mix = VMFMixture(D_TRUE, len(KAPPAS), kappa_estimator="banerjee", init_iters=50, seed=0).fit(X, torch.arange(N), N)
    assert mix.centroids.shape == (len(KAPPAS), D_TRUE)
    cos, best = match_components(mix, means)
    assert (cos > 0.99).all(), cos
    ratio = mix.kappa[best] / torch.tensor(KAPPAS)
    assert ((ratio - 1).abs() < 0.10).all(), ratio
    assert mix.counts.sum() == N


def test_recover_kappa_pca_when_extra_dims_carry_no_signal(mixture_data):
    """The same mixture embedded in D = 64 by a random orthogonal map: the 48 extra dimensions
    carry nothing. eq. 16 with d' = 16 recovers kappa; eq. 7 with D = 64 overstates it (~4x)."""
    means, X, _ = mixture_data
    D = 64
    Q = torch.linalg.qr(torch.randn(D, D_TRUE, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    Y, means_D = (X.double() @ Q.T).float(), (means.double() @ Q.T).float()
    N = len(Y)
    fits = {mode: VMFMixture(D, len(KAPPAS), kappa_estimator=mode, pca_dim=D_TRUE, init_iters=50, seed=0)
            .fit(Y, torch.arange(N), N) for mode in ("pca", "banerjee")}
    truth = torch.tensor(KAPPAS)
    for mode, mix in fits.items():
        cos, best = match_components(mix, means_D)
        assert (cos > 0.99).all(), (mode, cos)
        ratio = mix.kappa[best] / truth
        if mode == "pca":
            assert ((ratio - 1).abs() < 0.10).all(), ratio
        else:
            assert (ratio > 2).all(), ratio          # D = 64 in eq. 7 where the sphere is 16-dimensional


def test_pca_kappa_matches_direct_computation():
    """eq. 16 against a direct numpy computation: top-d' eigenvectors P of the features'
    covariance, rbar'_k = ||P^T r_k|| / n_k, kappa_k = eq. 7 with d'. The features are
    anisotropic and the centroids have weight outside the top-d' subspace, so the projection
    changes rbar (it is not only d' in place of D)."""
    g = torch.Generator().manual_seed(0)
    D, dp, K = 12, 4, 5
    X = unit(torch.randn(3000, D, generator=g) * torch.logspace(0, -1.5, D) + 0.3 * torch.ones(D))
    C = unit(X[:K] + 0.1 * torch.randn(K, D, generator=g))
    mix = with_state(D, C, kappa_estimator="pca", pca_dim=dp, kmeans_iters=0)
    mix.fit(X, torch.arange(len(X)), len(X))
    Xd = X.double().numpy()
    lab = (X @ mix.centroids.T).argmax(1).numpy()
    cov = np.cov(Xd.T, bias=True)
    P = np.linalg.eigh(cov)[1][:, -dp:]
    for k in range(K):
        r = Xd[lab == k].sum(0)
        rbar_p = np.linalg.norm(P.T @ r) / (lab == k).sum()
        assert abs(rbar_p - np.linalg.norm(r) / (lab == k).sum()) > 0.01          # projection matters here
        want = rbar_p * (dp - rbar_p ** 2) / (1 - rbar_p ** 2)
        assert abs(float(mix.kappa[k]) / want - 1) < 1e-4, (k, float(mix.kappa[k]), want)


def test_kappa_mle_formula():
    """eq. 7 is Banerjee's approximation of A_d^{-1}: within a few % of the exact inverse for moderate kappa."""
    for d in (16, 64, 256):
        for kappa in (0.5 * d, 2.0 * d, 8.0 * d):
            rbar = mean_resultant(kappa, d)
            assert abs(float(kappa_mle(torch.tensor(rbar), d)) / kappa - 1) < 0.05


# ---------------------------------------------------------------------------- merging (eq. 11)
def test_distance_moments_match_all_pairs_at_K500():
    """E[d], sigma[d] from sums (no K x K matrix) equal the all-pairs values, for spread-out
    centroids and for centroids in a narrow cone (where E[cos^2] - E[cos]^2 cancels badly)."""
    g = torch.Generator().manual_seed(0)
    spread = unit(torch.randn(500, 32, generator=g))
    cone = unit(4 * unit(torch.randn(32, generator=g)) + torch.randn(500, 32, generator=g) / 32 ** 0.5)
    for M in (spread, cone):
        mean_d, std_d = distance_moments(unit(M).contiguous())
        bm, bs = brute_moments(M)
        assert abs(mean_d - bm) < 1e-6 and abs(std_d - bs) < 1e-5 * max(1, bs), (mean_d, bm, std_d, bs)
    assert brute_moments(cone)[0] < 0.1                  # the cone really is narrow


@pytest.fixture
def hand_built():
    """19 centroids in D = 8 with known distances (d = 1 - cos of the angle in a plane):
    P: a chain at angles 0, .2, .3, .45 in (e0, e1): d(P1,P2)=.0050 d(P2,P3)=.0112 d(P0,P1)=.0199
       d(P1,P3)=.0311 d(P0,P2)=.0447 d(P0,P3)=.0996
    Q: angles 0, .12, .25 in (e2, e3): d(Q0,Q1)=.0072 d(Q1,Q2)=.0084 d(Q0,Q2)=.0311
    R: a pair at angle .4 (d=.0789); S: a pair at angle .6 (d=.1747); F: -e_0 .. -e_7 (d >= 1).
    With the threshold at 0.12, closest first, each node once: (P1,P2) .0050, (Q0,Q1) .0072,
    (R0,R1) .0789, (P0,P3) .0996; Q1-Q2, P2-P3, P0-P1, ... are skipped (a node already used)."""
    D = 8
    vecs = ([rot(D, 0, 1, t) for t in (0, .2, .3, .45)] + [rot(D, 2, 3, t) for t in (0, .12, .25)]
            + [rot(D, 4, 5, t) for t in (0, .4)] + [rot(D, 6, 7, t) for t in (0, .6)]
            + [-torch.eye(D, dtype=torch.float64)[i] for i in range(D)])
    names = ["P0", "P1", "P2", "P3", "Q0", "Q1", "Q2", "R0", "R1", "S0", "S1"] + [f"F{i}" for i in range(D)]
    M = torch.stack(vecs)
    counts = torch.arange(1, len(M) + 1) * 3
    kappa = torch.linspace(10, 50, len(M))
    mean_d, std_d = brute_moments(M)
    lam = (mean_d - 0.12) / std_d                        # puts E[d] - lam sigma[d] at 0.12
    return D, M, names, counts, kappa, lam


def merged_state(M, counts, kappa, groups):
    """Expected (centroid, count, kappa) of each final cluster: groups of original ids."""
    out = []
    for g in groups:
        n = counts[g].double()
        mu = F.normalize((n[:, None] * M[g]).sum(0), dim=0)
        out.append((mu, int(n.sum()), float((n * kappa[g].double()).sum() / n.sum())))
    return out


def check_final(mix, expected):
    """The mixture holds exactly the expected clusters (in any order)."""
    assert mix.centroids.shape[0] == len(expected)
    assert torch.allclose(mix.centroids.norm(dim=1), torch.ones(len(expected)), atol=1e-6)
    cos = torch.stack([e[0] for e in expected]).float() @ mix.centroids.T
    same = cos > 1 - 1e-6                                # the originals are >= .005 apart: unambiguous
    assert (same.sum(1) == 1).all() and (same.sum(0) == 1).all(), cos
    for (mu, n, kap), j in zip(expected, same.float().argmax(1).tolist()):
        assert int(mix.counts[j]) == n
        assert abs(float(mix.kappa[j]) - kap) < 1e-4 * kap


def test_merge_hand_built_case(hand_built):
    D, M, names, counts, kappa, lam = hand_built
    mix = with_state(D, M, counts, kappa)
    brute = brute_greedy(M, 0.12)
    assert [(names[j], names[k]) for j, k in brute] == [("P1", "P2"), ("Q0", "Q1"), ("R0", "R1"), ("P0", "P3")]
    merged, info = mix.merge(merge_lambda=lam)
    thresh = info["merge_threshold"]
    assert abs(thresh - 0.12) < 1e-6
    assert merged == 4 and mix.centroids.shape[0] == len(M) - 4
    pairs = {frozenset(p) for p in brute}
    groups = [sorted(p) for p in pairs] + [[i] for i in range(len(M)) if not any(i in p for p in pairs)]
    check_final(mix, merged_state(M, counts, kappa, groups))
    assert int(mix.counts.sum()) == int(counts.sum())


def test_merge_leaves_earlier_state_untouched(hand_built):
    """merge() builds new tensors: a state_dict() taken before it (or the checkpoint dict a
    mixture was loaded from, whose tensors it shares) keeps the pre-merge values."""
    D, M, names, counts, kappa, lam = hand_built
    mix = with_state(D, M, counts.clone(), kappa.clone())
    sd = mix.state_dict()
    before = {k: sd[k].clone() for k in ("centroids", "counts", "kappa")}
    assert mix.merge(merge_lambda=lam)[0] == 4
    for k, v in before.items():
        assert torch.equal(sd[k], v), k


def test_merge_respects_min_clusters(hand_built):
    D, M, names, counts, kappa, lam = hand_built
    mix = with_state(D, M, counts, kappa)
    merged, _ = mix.merge(merge_lambda=lam, min_clusters=len(M) - 2)
    assert merged == 2 and mix.centroids.shape[0] == len(M) - 2
    groups = [[1, 2], [4, 5]] + [[i] for i in range(len(M)) if i not in (1, 2, 4, 5)]  # the two closest pairs
    check_final(mix, merged_state(M, counts, kappa, groups))
    assert mix.merge(merge_lambda=lam, min_clusters=len(M) - 2)[0] == 0      # K is at the floor: no more merges
    assert mix.centroids.shape[0] == len(M) - 2


def test_merge_degenerate_sizes():
    m = with_state(4, torch.eye(4)[:2])
    merged, info = m.merge(merge_lambda=0.0)
    assert merged == 0 and info == {} and m.centroids.shape[0] == 2


def test_merge_many_pairs_each_cluster_at_most_once():
    """A threshold above the mean (lam < 0) makes most pairs mergeable: still each cluster is in
    at most one pair, the pairs are the brute-force greedy matching, K drops by the number of
    merges, counts are conserved."""
    g = torch.Generator().manual_seed(3)
    K = 40
    M = unit(torch.randn(K, 6, generator=g))
    mean_d, std_d = brute_moments(M)
    thresh = mean_d + 0.5 * std_d
    rows, cols, d = close_pairs(M.numpy(), thresh, neighbours=K - 1)
    a, b = greedy_matching(rows, cols, d, len(M))
    nodes = np.concatenate([a, b])
    assert len(np.unique(nodes)) == len(nodes)
    assert sorted(zip(a.tolist(), b.tolist())) == sorted(brute_greedy(M, thresh))
    mix = with_state(6, M, torch.ones(K, dtype=torch.long))
    merged, _ = mix.merge(merge_lambda=-0.5, neighbours=K - 1)
    assert merged == len(a) > 10 and mix.centroids.shape[0] == K - merged
    assert sorted(mix.counts.tolist()) == [1] * (K - 2 * merged) + [2] * merged


# ---------------------------------------------------------------------------- the likelihood rule (bic, views)
def test_vmf_loglik_is_the_sum_of_vmf_log_densities_at_the_mle():
    """vmf_loglik(n, rbar, d) = n (log C_d(kappa) + kappa rbar) is sum_i log f(z_i | mu, kappa)
    (eq. 3, 4) with mu the mean direction (eq. 6) and kappa eq. 7's estimate: scipy's vMF
    log-density summed over the samples gives the same number."""
    from scipy.stats import vonmises_fisher
    rng = np.random.default_rng(0)
    for d, kappa in ((16, 40.0), (64, 300.0), (128, 90.0)):
        mu = rng.standard_normal(d)
        mu /= np.linalg.norm(mu)
        Z = sample_vmf(mu, kappa, 500, rng)
        r = Z.sum(0)
        rbar = np.linalg.norm(r) / len(Z)
        k_hat = float(kappa_mle(torch.tensor(rbar, dtype=torch.float64), d))
        direct = vonmises_fisher(r / np.linalg.norm(r), k_hat).logpdf(Z).sum()
        got = float(merge_rules.vmf_loglik(torch.tensor(500.0, dtype=torch.float64), torch.tensor(rbar, dtype=torch.float64), d))
        # log I_v by Debye's expansion (error O(1/v^2)): within 1e-5 relative of scipy's at d >= 16
        assert got == pytest.approx(direct, rel=1e-5), (d, got, direct)


def fitted(X, means, **kw):
    """A mixture warm-started from the given centroids on X, after one fit (counts, rbar, kappa)."""
    m = with_state(X.shape[1], means, kappa_estimator="banerjee", kmeans_iters=0, **kw)
    m.fit(X, torch.arange(len(X)), len(X))
    return m


def test_bic_keeps_two_separated_components_and_merges_two_halves_of_one():
    """Two vMF components 90 degrees apart, kappa 60 in D = 16: one component cannot explain
    both, the rule keeps them. One component cut in two through its mean (two clusters whose
    centroids are the halves' means): the two halves are one vMF, the rule merges them, and
    the score is the hand-computed BIC difference."""
    rng = np.random.default_rng(1)
    e = np.eye(16)
    two = torch.from_numpy(np.concatenate([sample_vmf(e[0], 60.0, 400, rng), sample_vmf(e[1], 60.0, 400, rng)])).float()
    m = fitted(two, e[:2])
    assert m.counts.tolist() == [400, 400]
    assert m.merge(merge_rule="bic")[0] == 0 and m.centroids.shape[0] == 2
    one = torch.from_numpy(sample_vmf(e[0], 60.0, 800, rng)).float()
    side = one[:, 1] > 0
    halves = torch.stack([F.normalize(one[side].mean(0), dim=0), F.normalize(one[~side].mean(0), dim=0)])
    for _ in range(20):   # Lloyd to its fixed point, where each centroid is its members' mean direction
        ids = torch.from_numpy(cluster.nearest_centroid(one.numpy(), halves.numpy())[1]).long()
        halves = torch.stack([F.normalize(one[ids == i].double().sum(0), dim=0).float() for i in (0, 1)])
    m = fitted(one, halves)
    assert m.counts.sum() == 800 and m.counts.min() > 300           # two halves of about 400
    # by hand: the halves' and the union's bias-corrected rbar, eq. 7, the loglik, the penalty
    def ll(Z):
        n = len(Z)
        rb = math.sqrt(max(0.0, (float(Z.sum(0).norm()) ** 2 / n - 1) / (n - 1)))
        return float(merge_rules.vmf_loglik(torch.tensor(float(n), dtype=torch.float64), torch.tensor(rb, dtype=torch.float64), 16))
    a, b = (one[m.counts.new_tensor(cluster.nearest_centroid(one.numpy(), m.centroids.numpy())[1]) == i] for i in (0, 1))
    want = 2 * (ll(a) + ll(b) - ll(one)) - 2 / math.pi * 800 * (1 + math.sqrt(16 / 800)) ** 2 - 17 * math.log(800)
    rows, cols, d = search.close_pairs(m.centroids.numpy(), 2.5, 5)
    assert merge_rules.bic_loss(m, rows, cols, d)[0] == pytest.approx(want, abs=2)   # of terms ~500: float32 centroids
    assert want < 0
    merged, _ = m.merge(merge_rule="bic")
    assert merged == 1 and m.centroids.shape[0] == 1 and m.counts.tolist() == [800]


def test_views_rule_merges_clusters_closer_than_two_views_and_otherwise_is_bic():
    """The two separated components above (d = 1 between their centroids) are kept by the
    likelihood; with views of one image farther apart than that (view_distance 1.1) they are
    one cluster to the model; at view_distance 0 the rule is the BIC rule."""
    rng = np.random.default_rng(1)
    e = np.eye(16)
    two = torch.from_numpy(np.concatenate([sample_vmf(e[0], 60.0, 400, rng), sample_vmf(e[1], 60.0, 400, rng)])).float()
    assert fitted(two, e[:2]).merge(merge_rule="views", view_distance=0.0)[0] == 0
    assert fitted(two, e[:2]).merge(merge_rule="views", view_distance=0.9)[0] == 0
    m = fitted(two, e[:2])
    merged, info = m.merge(merge_rule="views", view_distance=1.1)
    assert merged == 1 and info["view_distance"] == 1.1


def test_births_recover_a_component_that_merging_took():
    """Three components, fitted with two centroids (one sits between components 1 and 2, as
    after an over-merge): a fit with births seeds a centroid at the worst-explained samples,
    the Lloyd iterations give it its component, and the likelihood keeps all three."""
    rng = np.random.default_rng(2)
    e = np.eye(16)
    X = torch.from_numpy(np.concatenate([sample_vmf(e[i], 80.0, 300, rng) for i in range(3)])).float()
    start = np.stack([e[0], (e[1] + e[2]) / np.sqrt(2)])
    m = with_state(16, start, kappa_estimator="banerjee", kmeans_iters=10, births=0.5)
    m.fit(X, torch.arange(900), 900)
    assert m.born == 1 and m.centroids.shape[0] == 3
    assert sorted(m.counts.tolist()) == [300, 300, 300]
    m.merge(merge_rule="bic")
    assert m.centroids.shape[0] == 3
    still = with_state(16, start, kappa_estimator="banerjee", kmeans_iters=10)         # no births: two clusters stay two
    still.fit(X, torch.arange(900), 900)
    assert still.centroids.shape[0] == 2 and still.born == 0


def test_greedy_matching_equals_python_loop():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 40))
        m = int(rng.integers(0, 4 * n))
        rows, cols = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = rows != cols
        rows, cols = np.minimum(rows, cols)[keep], np.maximum(rows, cols)[keep]
        d = rng.uniform(0, 1, len(rows))
        if trial % 2:
            d = np.round(d, 1)                           # ties: closest first, then input order
        max_pairs = None if trial % 3 else int(rng.integers(0, n))
        a, b = greedy_matching(rows, cols, d, n, max_pairs=max_pairs)
        assert list(zip(a.tolist(), b.tolist())) == loop_greedy(rows, cols, d, max_pairs), trial


def test_close_pairs_exact_path_is_all_pairs_below_threshold():
    g = torch.Generator().manual_seed(1)
    M = unit(torch.randn(300, 8, generator=g))
    thresh = 0.15
    rows, cols, d = close_pairs(M.numpy(), thresh, neighbours=299)
    dist = 1 - M.double() @ M.double().T
    truth = {(j, k) for j in range(300) for k in range(j + 1, 300) if dist[j, k] < thresh}
    assert set(zip(rows.tolist(), cols.tolist())) == truth and len(rows) == len(truth)
    assert np.allclose(d, dist[rows, cols].numpy(), atol=1e-6)
    assert (rows < cols).all()


def test_close_pairs_cell_path_finds_planted_pairs():
    """K above exact_max on a CPU: coarse k-means cells, pairs compared inside each cell. 60
    planted near-duplicate pairs among 3000 random centroids (no random pair is that close)
    are all found, with their exact distances, and nothing else."""
    g = torch.Generator().manual_seed(0)
    D, K0, P = 32, 3000, 60
    base = unit(torch.randn(K0, D, generator=g))
    twins = unit(base[:P] + 2e-3 * torch.randn(P, D, generator=g))
    M = torch.cat([base, twins])
    perm = torch.randperm(len(M), generator=g)
    M = M[perm].contiguous()
    where = torch.empty_like(perm)
    where[perm] = torch.arange(len(M))
    planted = {tuple(sorted((int(where[i]), int(where[K0 + i])))) for i in range(P)}
    thresh = 1e-3
    exact = close_pairs(M.numpy(), thresh)
    cells = close_pairs(M.numpy(), thresh, exact_max=100)
    for rows, cols, d in (exact, cells):
        assert set(zip(rows.tolist(), cols.tolist())) == planted and len(rows) == P
        true_d = 1 - (M[torch.from_numpy(rows)] * M[torch.from_numpy(cols)]).sum(1)
        assert np.allclose(d, true_d.numpy(), atol=1e-6)


def test_pairs_within_cells_small_and_uneven_cells():
    """Cells of 0, 1, 2 and many members in one batch: each member's nearest others in its own
    cell, padding never reported."""
    g = torch.Generator().manual_seed(0)
    M = unit(torch.randn(40, 5, generator=g))
    cell = torch.tensor([0] * 25 + [1] * 2 + [2] * 1 + [4] * 12)          # cell 3 is empty
    rows, cols, d = search._pairs_within_cells(M, cell, 5, neighbours=3, batch=3)
    for j in range(40):
        same = [k for k in range(40) if cell[k] == cell[j] and k != j]
        want = sorted(same, key=lambda k: -float(M[j] @ M[k]))[:3]
        assert sorted(cols[rows == j].tolist()) == sorted(want), j
    assert np.allclose(d, 1 - (M[rows] * M[cols]).sum(1).numpy(), atol=1e-6)


# ---------------------------------------------------------------------------- warm start (sec. 4.3)
@pytest.fixture(scope="module")
def twenty_clusters():
    """20 vMF components (kappa 30) with random means in 16 dims, overlapping enough that
    k-means needs a dozen or more iterations from a random start; and a slightly drifted copy
    (the next epoch's features)."""
    rng = np.random.default_rng(1)
    means = rng.standard_normal((20, 16))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    X, _ = vmf_mixture(means, [30.0] * 20, 300, seed=2)
    drift = unit(X + 0.05 * torch.randn(X.shape, generator=torch.Generator().manual_seed(0)))
    return X, drift


def test_warm_start_zero_iterations_keeps_centroids(twenty_clusters):
    X, _ = twenty_clusters
    N = len(X)
    mix = VMFMixture(16, 20, kappa_estimator="banerjee", init_iters=100, tol=1e-6, seed=0).fit(X, torch.arange(N), N)
    before = mix.centroids.clone(), mix.counts.clone(), mix.kappa.clone()
    mix.kmeans_iters = 0
    mix.fit(X, torch.arange(N), N)
    assert mix.n_iter == 0
    assert torch.equal(mix.centroids, before[0])
    assert torch.equal(mix.counts, before[1]) and torch.allclose(mix.kappa, before[2])


def test_warm_start_converges_faster_than_fresh(twenty_clusters):
    X, drift = twenty_clusters
    N = len(X)
    idx = torch.arange(N)
    kw = dict(kappa_estimator="banerjee", init_iters=100, kmeans_iters=100, tol=1e-4)
    for seed in (0, 1, 2):
        mix = VMFMixture(16, 20, seed=seed, **kw).fit(X, idx, N)
        fresh_same = mix.n_iter
        mix.fit(X, idx, N)                                   # same data: already converged
        assert mix.n_iter < fresh_same and mix.n_iter <= 2
        mix.fit(drift, idx, N)                               # next epoch: features moved a little
        fresh_drift = VMFMixture(16, 20, seed=seed, **kw).fit(drift, idx, N).n_iter
        assert mix.n_iter < fresh_drift, (mix.n_iter, fresh_drift)


def test_reinit_keeps_best_of_restarts(twenty_clusters):
    """The PCL-style ablation: every fit starts afresh with nredo restarts (restart r seeded
    seed + r on the first fit) and keeps the restart with the best objective. Each restart
    alone is a one-restart mixture with that seed; nredo = 5 must return the best of the five,
    here not the first."""
    X, _ = twenty_clusters
    N = len(X)
    idx = torch.arange(N)
    alone = [VMFMixture(16, 20, kappa_estimator="banerjee", reinit_centroids=True, nredo=1, seed=r).fit(X, idx, N) for r in range(5)]
    best = max(range(5), key=lambda r: alone[r].objective)
    assert best != 0 and alone[best].objective > alone[0].objective + 1e-4
    five = VMFMixture(16, 20, kappa_estimator="banerjee", reinit_centroids=True, nredo=5, seed=0).fit(X, idx, N)
    assert five.objective == alone[best].objective
    assert torch.equal(five.centroids, alone[best].centroids)
    five.fit(X, idx, N)                                      # reinit: a new random start, not a warm one
    assert five.fits == 2 and five.n_iter > 2


def test_reinit_keeps_the_merged_k(twenty_clusters):
    """Re-initialising changes where the centroids start, not K: after merges the next fresh
    k-means has the merged K, not K0 again (else the ablation would undo eq. 11 every epoch)."""
    X, _ = twenty_clusters
    N = len(X)
    idx = torch.arange(N)
    mix = VMFMixture(16, 40, kappa_estimator="banerjee", reinit_centroids=True, nredo=2, seed=0).fit(X, idx, N)
    merged, _ = mix.merge(merge_lambda=0.0)
    k = mix.centroids.shape[0]
    assert merged > 0 and k < 40
    mix.fit(X, idx, N)
    assert mix.centroids.shape[0] <= k


# ---------------------------------------------------------------------------- kappa guards, state
def test_singleton_cluster_gets_median_kappa():
    D = 8
    rng = np.random.default_rng(0)
    e = np.eye(D)
    X = np.concatenate([sample_vmf(e[0], 50.0, 300, rng), sample_vmf(e[1], 80.0, 300, rng), e[2:3]])
    X = torch.from_numpy(X).float()
    N = len(X)
    for mode in ("banerjee", "pca"):
        mix = with_state(D, e[:3], kappa_estimator=mode, pca_dim=6, kmeans_iters=0)  # warm start from the true means
        mix.fit(X, torch.arange(N), N)
        assert mix.counts.tolist() == [300, 300, 1]
        assert torch.isfinite(mix.kappa).all()
        assert float(mix.kappa[2]) == float(mix.kappa[:2].median())
        assert torch.isfinite(mix.kappa_for_loss()).all()


def test_duplicate_pair_cluster_does_not_swamp_kappa():
    """Two identical features form a cluster with rbar = 1 (kappa ~ 1e7 from eq. 7 alone):
    kappa is clamped at kappa_clip x the median, so the other clusters keep their weight in
    the loss (kappa_for_loss near 1) instead of ~1e-4."""
    D = 32
    rng = np.random.default_rng(0)
    means = rng.standard_normal((20, D))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    dup = -means[0]
    X = torch.from_numpy(np.concatenate([np.concatenate([sample_vmf(m, 100.0, 200, rng) for m in means]),
                                         dup[None], dup[None]])).float()
    for mode in ("banerjee", "pca"):
        mix = with_state(D, np.concatenate([means, dup[None]]), kappa_estimator=mode, pca_dim=24, kmeans_iters=0)
        mix.fit(X, torch.arange(len(X)), len(X))
        assert mix.counts[-1] == 2
        assert float(mix.kappa[-1]) <= mix.kappa_clip * float(mix.kappa.median()) * (1 + 1e-6)
        k = mix.kappa_for_loss()
        assert 0.5 < float(k[:20].mean()) <= 1, (mode, k)


def test_kappa_for_loss_mean_one_then_clipped():
    mix = with_state(4, torch.eye(4), kappas=[1.0, 2.0, 3.0, 100.0], kappa_clip=2.0)
    k = mix.kappa_for_loss()
    raw = mix.kappa / mix.kappa.mean()
    assert abs(float(raw.mean()) - 1) < 1e-6
    assert torch.allclose(k, raw.clamp(max=2.0))
    assert float(k.max()) == 2.0
    mix.kappa_clip = 10.0
    assert abs(float(mix.kappa_for_loss().mean()) - 1) < 1e-6     # no clipping: mean exactly 1
    const = VMFMixture(4, 2, kappa_estimator="const").fit(unit(torch.randn(50, 4)), torch.arange(50), 50)
    assert torch.equal(const.kappa, torch.ones(const.centroids.shape[0]))


def test_empty_clusters_are_dropped():
    D = 8
    rng = np.random.default_rng(0)
    e = np.eye(D)
    X = torch.from_numpy(np.concatenate([sample_vmf(e[i], 50.0, 200, rng) for i in range(3)])).float()
    N = len(X)
    mix = with_state(D, np.concatenate([e[:3], -e[:1]]), kappa_estimator="banerjee", kmeans_iters=2)  # -e0: nobody's nearest
    mix.fit(X, torch.arange(N), N)
    assert mix.centroids.shape[0] == 3 and len(mix.counts) == 3 and len(mix.kappa) == 3
    assert mix.counts.tolist() == [200, 200, 200]
    assert (mix.centroids @ torch.from_numpy(e[:3]).float().T).diag().min() > 0.99


def test_state_dict_round_trip(twenty_clusters):
    X, drift = twenty_clusters
    N = len(X)
    idx = torch.arange(N)
    mix = VMFMixture(16, 20, kappa_estimator="pca", pca_dim=12, seed=0).fit(X, idx, N)
    mix.merge(merge_lambda=1.0)
    mix.k_history.append(int(mix.centroids.shape[0]))
    buf = io.BytesIO()
    torch.save({"mixture": mix.state_dict()}, buf)
    buf.seek(0)
    back = VMFMixture(16, 20, kappa_estimator="pca", pca_dim=12, seed=0)
    back.load_state_dict(torch.load(buf)["mixture"])         # weights_only load works
    for name in ("centroids", "counts", "kappa"):
        assert torch.equal(getattr(back, name), getattr(mix, name))
    assert back.k_history == mix.k_history and back.fits == mix.fits and back.objective == mix.objective
    assert {k: v for k, v in back.summary().items() if k != "kmeans_iters"} == \
        {k: v for k, v in mix.summary().items() if k != "kmeans_iters"}
    mix.fit(drift, idx, N), back.fit(drift, idx, N)         # resume: the same warm start
    assert torch.equal(back.centroids, mix.centroids) and torch.equal(back.kappa, mix.kappa)


def test_assign_nearest_centroids_and_weights():
    pytest.importorskip("loss")
    g = torch.Generator().manual_seed(0)
    C = unit(torch.randn(10, 8, generator=g))
    mix = with_state(8, C, counts=list(range(1, 11)), kappas=torch.linspace(1, 3, 10).tolist())
    z = unit(torch.randn(100, 8, generator=g))
    nbr, w = mix.assign(z, s=3, tau=0.5)
    sims = z @ mix.centroids.T
    assert torch.equal(nbr, sims.topk(3, dim=1).indices)
    assert torch.allclose(w.sum(1), torch.ones(100), atol=1e-6)
    logits = mix.kappa_for_loss()[nbr] * sims.gather(1, nbr) / 0.5
    assert torch.allclose(w, logits.softmax(1), atol=1e-6)
    nbr1, w1 = mix.assign(z, s=1)
    assert torch.equal(nbr1[:, 0], sims.argmax(1)) and torch.equal(w1, torch.ones(100, 1))


# ---------------------------------------------------------------------------- bad input
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_error_more_clusters_than_samples():
    X = unit(torch.randn(50, 8))
    with pytest.raises(ValueError) as e:
        VMFMixture(8, 100).fit(X, torch.arange(50), 50)
    msg = one_line(e)
    assert "100" in msg and "N = 50" in msg and "clusters" in msg


def test_error_nan_features():
    X = unit(torch.randn(50, 8))
    X[7, 3] = float("nan")
    with pytest.raises(ValueError) as e:
        VMFMixture(8, 5).fit(X, torch.arange(50), 50)
    assert "NaN" in one_line(e)
    X[7, 3] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        VMFMixture(8, 5).fit(X, torch.arange(50), 50)


def test_error_dim_mismatch_with_saved_state():
    X = unit(torch.randn(60, 16))
    saved = VMFMixture(16, 4, kappa_estimator="banerjee").fit(X, torch.arange(60), 60).state_dict()
    with pytest.raises(ValueError) as e:
        VMFMixture(32, 4).load_state_dict(saved)
    msg = one_line(e)
    assert "D = 16" in msg and "D = 32" in msg
    # and features of another D than the mixture's (e.g. a resumed model with another --dim)
    mix = VMFMixture(16, 4)
    mix.load_state_dict(saved)
    with pytest.raises(ValueError) as e:
        mix.fit(unit(torch.randn(60, 32)), torch.arange(60), 60)
    assert "D = 16" in one_line(e)


def test_error_index_outside_the_data_set():
    X = unit(torch.randn(50, 8))
    with pytest.raises(ValueError) as e:
        VMFMixture(8, 5).fit(X, torch.arange(50) + 1, 50)     # 1..50 with N = 50
    msg = one_line(e)
    assert "50" in msg and "0..49" in msg


def test_error_unknown_kappa_estimator():
    with pytest.raises(ValueError, match="pca, banerjee or const"):
        VMFMixture(8, 4, kappa_estimator="median")


# ---------------------------------------------------------------------------- DDP (gloo)
WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from cluster import VMFMixture

    def run(X, X2, idx, N):
        out = {{}}
        m = VMFMixture(X.shape[1], 12, kappa_estimator="pca", pca_dim=8, init_iters=30, kmeans_iters=5, seed=0)
        m.fit(X, idx, N)
        out["fit1"] = [m.centroids.clone(), m.counts.clone(), m.kappa.clone(), m.objective, m.n_iter]
        m.fit(X2, idx, N)                                    # warm start on the next epoch's features
        out["fit2"] = [m.centroids.clone(), m.counts.clone(), m.kappa.clone(), m.objective, m.n_iter]
        merged, info = m.merge(merge_lambda=1.0)
        out["merge"] = [merged, info["merge_threshold"], m.centroids.clone(), m.counts.clone(), m.kappa.clone()]
        b = VMFMixture(X.shape[1], 24, kappa_estimator="pca", pca_dim=8, init_iters=30, births=0.25, seed=0)
        b.fit(X, idx, N)
        b.fit(X2, idx, N)                                    # births: each rank proposes, all pick the same
        merged, _ = b.merge(merge_rule="views", view_distance=0.05)
        out["views"] = [b.born, merged, b.centroids.clone(), b.counts.clone(), b.rbar.clone()]
        out["assign"] = list(m.assign(X2, s=3, tau=0.2)) + [idx]
        t = m.assignment_table(X2, idx, N, s=3, tau=0.2)     # every row, on every rank
        out["table"] = [t.nbr, t.w]
        r = VMFMixture(X.shape[1], 12, kappa_estimator="banerjee", reinit_centroids=True, nredo=2, init_iters=10, seed=0)
        r.fit(X, idx, N)
        out["reinit"] = [r.centroids.clone(), r.counts.clone(), r.kappa.clone(), r.objective]
        return out

    if __name__ == "__main__":
        rank, world = int(sys.argv[1]), int(sys.argv[2])
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=world)
        data = torch.load(sys.argv[4])
        if sys.argv[6] == "interleaved":                     # DistributedSampler-style shard
            mine = torch.arange(rank, len(data["X"]), world)
        else:                                                # more ranks than feature batches:
            mine = torch.arange(len(data["X"]) if rank == 0 else 0)   # rank 1 holds no sample
        out = run(data["X"][mine], data["X2"][mine], mine, len(data["X"]))
        torch.save(out, sys.argv[5] + f".rank{{rank}}")
        dist.barrier()
        dist.destroy_process_group()
""")


@pytest.mark.parametrize("shard", ["interleaved", "empty"])
def test_two_gloo_processes_match_one_process(tmp_path, shard):
    """Every fit, merge and assignment is the same on two ranks as on one: with the data
    interleaved over the ranks, and with rank 1 holding no sample at all (train.py's
    feature pass gives a rank no batch when there are more ranks than batches)."""
    rng = np.random.default_rng(5)
    means = rng.standard_normal((6, 16))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    X, _ = vmf_mixture(means, [25.0] * 6, 500, seed=6)
    X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(0))].contiguous()
    X2 = unit(X + 0.05 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1)))
    torch.save({"X": X, "X2": X2}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER.format(repo=REPO))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), "2", port,
                               str(tmp_path / "data.pt"), str(tmp_path / "out"), shard],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    # the same sequence on one process with all the data
    spec = {}
    exec(compile(WORKER.format(repo=REPO).split('if __name__ == "__main__":')[0], "worker", "exec"), spec)
    single = spec["run"](X, X2, torch.arange(len(X)), len(X))
    ranks = [torch.load(str(tmp_path / "out") + f".rank{r}") for r in range(2)]

    for out in ranks:
        for key in ("fit1", "fit2", "reinit"):
            c, n, k, obj = out[key][:4]
            assert torch.allclose(c, single[key][0], atol=1e-5), key
            assert torch.equal(n, single[key][1]), key
            assert torch.allclose(k, single[key][2], rtol=1e-5), key
            assert abs(obj - single[key][3]) < 1e-6, key
        assert out["fit1"][4] == single["fit1"][4] and out["fit2"][4] == single["fit2"][4]
        assert out["merge"][0] == single["merge"][0] and abs(out["merge"][1] - single["merge"][1]) < 1e-6
        assert torch.allclose(out["merge"][2], single["merge"][2], atol=1e-5)
        assert torch.equal(out["merge"][3], single["merge"][3])
        assert out["views"][:2] == single["views"][:2]                   # births and merges
        assert torch.allclose(out["views"][2], single["views"][2], atol=1e-5)
        assert torch.equal(out["views"][3], single["views"][3])
        assert torch.allclose(out["views"][4], single["views"][4], atol=1e-6)
    assert single["merge"][0] > 0                            # the comparison covered a real merge
    assert single["views"][0] > 0 and single["views"][1] > 0  # ... and real births and merges
    assert single["fit1"][1].sum() == len(X) and single["fit1"][0].shape[0] == 12
    # assignments: each rank's shard, put back in dataset order
    nbr = torch.empty_like(single["assign"][0])
    w = torch.empty_like(single["assign"][1])
    for out in ranks:
        nbr[out["assign"][2]], w[out["assign"][2]] = out["assign"][0], out["assign"][1]
    assert torch.equal(nbr, single["assign"][0])
    assert torch.allclose(w, single["assign"][1], atol=1e-5)
    # the training step's tables: each rank holds every sample's row, by dataset index (the
    # other ranks' rows come through the all-reduce), equal to one process's assignment
    for out in ranks:
        assert torch.equal(out["table"][0], single["assign"][0])
        assert torch.allclose(out["table"][1], single["assign"][1], atol=1e-5)


def test_torch_search_equals_faiss():
    """The E-step's search on a GPU when Faiss has no GPU build (torch matmul + top-k, chunked)
    returns Faiss's neighbours and similarities; run here on the CPU, in many chunks."""
    g = torch.Generator().manual_seed(0)
    q = unit(torch.randn(1000, 32, generator=g)).numpy()
    db = unit(torch.randn(300, 32, generator=g)).numpy()
    s1, i1 = search.knn_search(q, db, 5)                                    # Faiss, CPU
    s2, i2 = search.torch_search(q, db, 5, torch.device("cpu"), budget=300 * 64)   # 16 chunks
    assert s2.dtype == np.float32 and i2.dtype == np.int64 and i2.shape == (1000, 5)
    assert (i1 == i2).all()
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    empty = search.torch_search(q[:0], db, 3, torch.device("cpu"))
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)
