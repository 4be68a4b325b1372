"""Tests for loss.py: every loss against numbers computed independently here (plain Python
floats and loops over the paper's formulas), plus the gradient paths (stop-gradient on k,
no gradient into centroids / kappa / weights). CPU only, tiny tensors, float64.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster import Assignment, assignment_weights  # noqa: E402  (eq. 10, the E-step's weights)
from loss import (cluster_loss, cluster_loss_neg_centroids,  # noqa: E402
                  cluster_loss_neg_instances, infonce_loss, instance_loss, siammm_loss)

DT = torch.float64


def A(mu, kappa, nbr, w=None):
    """A batch's cluster.Assignment: centroids, kappa, nbr, w."""
    return Assignment(mu, kappa, torch.as_tensor(nbr), w)


# ---------------------------------------------------------------- independent helpers

def unit(*xs):
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def sqdist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def T(rows, grad=False):
    return torch.tensor(rows, dtype=DT, requires_grad=grad)


def ref_weights(z, mu, kappa, nbr, tau, log_prior=None):
    """eq. 10 with loops: w_ik = exp(kappa_k mu_k.z_i / tau) / sum_{j in N_i} (...)."""
    out = []
    for i, ids in enumerate(nbr):
        logits = [kappa[k] * dot(mu[k], z[i]) / tau + (log_prior[k] if log_prior else 0.0) for k in ids]
        m = max(logits)
        e = [math.exp(l - m) for l in logits]
        out.append([x / sum(e) for x in e])
    return out


def ref_cluster(q, mu, kappa, nbr, w):
    """eq. 9 with loops: -1/B sum_i sum_{k in N_i} w_ik kappa_k mu_k.q_i."""
    return -sum(sum(w[i][j] * kappa[k] * dot(mu[k], q[i]) for j, k in enumerate(ids))
                for i, ids in enumerate(nbr)) / len(q)


def neg_log_softmax0(logits):
    """-log(exp(l_0) / sum_j exp(l_j))."""
    m = max(logits)
    return -(logits[0] - m - math.log(sum(math.exp(l - m) for l in logits)))


# A fixed tiny mixture in 3-d: 4 unit centroids, per-cluster kappa.
MU = [unit(1, 0, 0), unit(0, 1, 0), unit(1, 1, 0), unit(0, 0.3, 1)]
KAPPA = [1.0, 2.0, 0.5, 1.5]
Z = [unit(0.9, 0.4, 0.1), unit(0.1, 0.8, 0.6)]
Q = [unit(0.7, 0.2, -0.3), unit(-0.2, 0.9, 0.4)]
NBR = [[0, 2, 1], [1, 3, 2]]


# ---------------------------------------------------------------- eq. 12 instance loss

def test_instance_loss_hand_computed():
    q1 = [[1.0, 0.0], unit(3, 4)]
    q2 = [[0.6, 0.8], [0.0, -1.0]]
    k1 = [[0.8, 0.6], unit(1, 1)]
    k2 = [[0.0, 1.0], unit(4, 3)]
    # ||a - b||^2 == 2 - 2 a.b for unit vectors; average over batch, then over the two pairs
    d12 = sum(sqdist(a, b) for a, b in zip(q1, k2)) / 2
    d21 = sum(sqdist(a, b) for a, b in zip(q2, k1)) / 2
    expected = 0.5 * (d12 + d21)
    # spot check of the first pair by hand: D([1,0],[0,1]) = 2, D([.6,.8],[.8,.6]) = 2 - 2*.96
    assert sqdist(q1[0], k2[0]) == pytest.approx(2.0)
    assert sqdist(q2[0], k1[0]) == pytest.approx(0.08)
    got = instance_loss(T(q1), T(q2), T(k1), T(k2))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_instance_loss_extremes():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=DT), dim=1)
    assert instance_loss(q, q, q, q).item() == pytest.approx(0.0, abs=1e-12)
    assert instance_loss(q, q, -q, -q).item() == pytest.approx(4.0, abs=1e-12)


def test_instance_loss_gradient_only_into_q():
    q1, q2 = T([[1.0, 0.0], [0.6, 0.8]], grad=True), T([[0.0, 1.0], [0.8, -0.6]], grad=True)
    k1, k2 = T([[0.6, 0.8], [1.0, 0.0]], grad=True), T([[0.0, -1.0], [0.8, 0.6]], grad=True)
    instance_loss(q1, q2, k1, k2).backward()
    assert k1.grad is None and k2.grad is None          # stop-gradient sg(k)
    B = 2
    # d/dq1 of 1/2 * 1/B sum (2 - 2 q1.k2) = -k2 / B
    assert torch.allclose(q1.grad, -k2.detach() / B)
    assert torch.allclose(q2.grad, -k1.detach() / B)


# ---------------------------------------------------------------- eq. 10 weights

def test_assignment_weights_hand_computed():
    tau = 0.7
    got = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), tau)
    exp = ref_weights(Z, MU, KAPPA, NBR, tau)
    assert got.shape == (2, 3)
    assert torch.allclose(got, T(exp), atol=1e-12)
    assert torch.allclose(got.sum(1), torch.ones(2, dtype=DT))


def test_assignment_weights_no_grad():
    z, mu, kap = T(Z, grad=True), T(MU, grad=True), T(KAPPA, grad=True)
    w = assignment_weights(z, mu, kap, torch.tensor(NBR), 1.0)
    assert not w.requires_grad


def test_assignment_weights_s1_is_hard():
    nbr = torch.tensor([[2], [3]])
    w = assignment_weights(T(Z), T(MU), T(KAPPA), nbr, 0.1)
    assert w.shape == (2, 1)
    assert torch.equal(w, torch.ones(2, 1, dtype=DT))


def test_assignment_weights_large_tau_uniform():
    for s in (2, 3):
        nbr = torch.tensor([row[:s] for row in NBR])
        w = assignment_weights(T(Z), T(MU), T(KAPPA), nbr, 1e9)
        assert torch.allclose(w, torch.full((2, s), 1.0 / s, dtype=DT), atol=1e-8)


def test_assignment_weights_small_tau_one_hot_on_kappa_cos():
    # sample 0: cos to mu_0 is the largest, but kappa_1 * cos(mu_1) wins (kappa_1 = 2)
    z = [unit(0.8, 0.6, 0.0)]
    cos = [dot(MU[k], z[0]) for k in (0, 1)]
    assert cos[0] > cos[1] and KAPPA[1] * cos[1] > KAPPA[0] * cos[0]
    w = assignment_weights(T(z), T(MU), T(KAPPA), torch.tensor([[0, 1]]), 1e-4)
    assert torch.allclose(w, T([[0.0, 1.0]]), atol=1e-12)
    # general case: the one-hot sits on argmax_k kappa_k mu_k.z over N_i
    w = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), 1e-5)
    for i, ids in enumerate(NBR):
        best = max(range(len(ids)), key=lambda j: KAPPA[ids[j]] * dot(MU[ids[j]], Z[i]))
        assert w[i, best].item() == pytest.approx(1.0, abs=1e-9)


def test_assignment_weights_log_prior():
    pi = [0.1, 0.2, 0.3, 0.4]
    lp = [math.log(p) for p in pi]
    # general case by hand
    got = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), 0.5, log_prior=T(lp))
    assert torch.allclose(got, T(ref_weights(Z, MU, KAPPA, NBR, 0.5, lp)), atol=1e-12)
    # with tau -> inf the kappa term vanishes: w_ik = pi_k / sum_{j in N_i} pi_j
    got = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), 1e12, log_prior=T(lp))
    exp = [[pi[k] / sum(pi[j] for j in ids) for k in ids] for ids in NBR]
    assert torch.allclose(got, T(exp), atol=1e-9)
    # a uniform prior changes nothing
    flat = T([math.log(0.25)] * 4)
    a = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), 0.5, log_prior=flat)
    b = assignment_weights(T(Z), T(MU), T(KAPPA), torch.tensor(NBR), 0.5)
    assert torch.allclose(a, b, atol=1e-12)


# ---------------------------------------------------------------- eq. 9 cluster loss

def test_cluster_loss_hand_computed():
    w = ref_weights(Z, MU, KAPPA, NBR, 0.7)
    got = cluster_loss(T(Q), None, A(T(MU), T(KAPPA), torch.tensor(NBR), T(w)))
    assert got.item() == pytest.approx(ref_cluster(Q, MU, KAPPA, NBR, w), abs=1e-12)


def test_cluster_loss_explicit_numbers():
    # one sample, q = mu_0, N = {0, 1}, w = (0.25, 0.75), kappa = (1, 2), mu_1 . q = 0
    # L = -(0.25 * 1 * 1 + 0.75 * 2 * 0) = -0.25
    got = cluster_loss(T([[1.0, 0.0, 0.0]]), None, A(T(MU), T(KAPPA), torch.tensor([[0, 1]]), T([[0.25, 0.75]])))
    assert got.item() == pytest.approx(-0.25, abs=1e-12)


def test_cluster_loss_s1_equals_hard_assignment():
    nbr = torch.tensor([[2], [1]])
    w = assignment_weights(T(Z), T(MU), T(KAPPA), nbr, 0.3)
    got = cluster_loss(T(Q), None, A(T(MU), T(KAPPA), nbr, w))
    hard = -sum(KAPPA[c] * dot(MU[c], Q[i]) for i, c in enumerate([2, 1])) / 2
    assert got.item() == pytest.approx(hard, abs=1e-12)


def test_cluster_loss_gradients():
    q = T(Q, grad=True)
    mu, kap = T(MU, grad=True), T(KAPPA, grad=True)
    w = T(ref_weights(Z, MU, KAPPA, NBR, 0.7), grad=True)
    cluster_loss(q, None, A(mu, kap, torch.tensor(NBR), w)).backward()
    assert mu.grad is None and kap.grad is None and w.grad is None   # fixed estimates
    # dL/dq_i = -1/B sum_{k in N_i} w_ik kappa_k mu_k
    B = len(Q)
    for i, ids in enumerate(NBR):
        g = [-sum(w[i, j].item() * KAPPA[k] * MU[k][d] for j, k in enumerate(ids)) / B for d in range(3)]
        assert torch.allclose(q.grad[i], T(g), atol=1e-12)


# ---------------------------------------------------------------- eq. 13 total

def _views():
    g = torch.Generator().manual_seed(1)
    f = lambda: torch.nn.functional.normalize(torch.randn(2, 3, generator=g, dtype=DT), dim=1)  # noqa: E731
    return f().requires_grad_(), f().requires_grad_(), f(), f()


@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_siammm_loss_is_inst_plus_weighted_clus(lam):
    q1, q2, k1, k2 = _views()
    nbr = torch.tensor(NBR)
    w = T(ref_weights(Z, MU, KAPPA, NBR, 0.7))
    total, l_inst, l_clus = siammm_loss(q1, q2, k1, k2, A(T(MU), T(KAPPA), nbr, w), cluster_weight=lam)
    a, b = q1.detach().tolist(), q2.detach().tolist()
    inst = 0.5 * (sum(sqdist(x, y) for x, y in zip(a, k2.tolist())) / 2
                  + sum(sqdist(x, y) for x, y in zip(b, k1.tolist())) / 2)
    w_ = w.tolist()
    clus = 0.5 * (ref_cluster(a, MU, KAPPA, NBR, w_) + ref_cluster(b, MU, KAPPA, NBR, w_))
    assert l_inst.item() == pytest.approx(inst, abs=1e-12)
    assert l_clus.item() == pytest.approx(clus, abs=1e-12)
    assert total.item() == pytest.approx(inst + lam * clus, abs=1e-12)
    assert total.requires_grad and not l_inst.requires_grad and not l_clus.requires_grad


def test_siammm_loss_no_instance():
    q1, q2, k1, k2 = _views()
    w = T(ref_weights(Z, MU, KAPPA, NBR, 0.7))
    total, l_inst, l_clus = siammm_loss(q1, q2, k1, k2, A(T(MU), T(KAPPA), NBR, w), cluster_weight=0.5,
                                        instance="none")
    assert l_inst.item() == 0.0
    exp = 0.5 * (cluster_loss(q1, None, A(T(MU), T(KAPPA), torch.tensor(NBR), w))
                 + cluster_loss(q2, None, A(T(MU), T(KAPPA), torch.tensor(NBR), w)))
    assert total.item() == pytest.approx(0.5 * exp.item(), abs=1e-12)
    total.backward()
    assert q1.grad is not None and q2.grad is not None


@pytest.mark.parametrize("kw", [dict(a=None), dict(cluster_weight=0.0)])
def test_siammm_loss_instance_only(kw):
    q1, q2, k1, k2 = _views()
    args = dict(a=A(T(MU), T(KAPPA), NBR, T(ref_weights(Z, MU, KAPPA, NBR, 0.7))))
    args.update(kw)
    total, l_inst, l_clus = siammm_loss(q1, q2, k1, k2, **args)
    assert l_clus.item() == 0.0
    assert total.item() == pytest.approx(instance_loss(q1, q2, k1, k2).item(), abs=1e-12)


def test_siammm_loss_variants_dispatch():
    q1, q2, k1, k2 = _views()
    a = A(T(MU), T(KAPPA), NBR)
    total, l_inst, _ = siammm_loss(q1, q2, k1, k2, instance="infonce", infonce_t=0.5)
    assert l_inst.item() == pytest.approx(infonce_loss(q1, q2, k1, k2, infonce_t=0.5).item(), abs=1e-12)
    _, _, l_clus = siammm_loss(q1, q2, k1, k2, a, cluster="neg-centroids", neg_t=0.3)
    exp = 0.5 * (cluster_loss_neg_centroids(q1, k2, a, 16000, 0.3) + cluster_loss_neg_centroids(q2, k1, a, 16000, 0.3))
    assert l_clus.item() == pytest.approx(exp.item(), abs=1e-12)
    _, _, l_clus = siammm_loss(q1, q2, k1, k2, a, cluster="neg-instances", neg_t=0.3)
    # each view's prediction against the other view's keys (as eq. 12 pairs q1 with k2)
    exp = 0.5 * (cluster_loss_neg_instances(q1, k2, a, neg_t=0.3) + cluster_loss_neg_instances(q2, k1, a, neg_t=0.3))
    assert l_clus.item() == pytest.approx(exp.item(), abs=1e-12)


def test_siammm_loss_bad_names():
    q1, q2, k1, k2 = _views()
    w = T(ref_weights(Z, MU, KAPPA, NBR, 0.7))
    with pytest.raises(KeyError):                      # the flags' choices are the tables' keys
        siammm_loss(q1, q2, k1, k2, instance="simclr")
    with pytest.raises(KeyError):
        siammm_loss(q1, q2, k1, k2, A(T(MU), T(KAPPA), NBR, w), cluster="swav")


# ---------------------------------------------------------------- InfoNCE (Table 4)

@pytest.mark.parametrize("temp", [1.0, 0.5, 0.2])
def test_infonce_hand_computed(temp):
    q1 = [unit(1, 0), unit(0.6, 0.8), unit(-1, 1)]
    q2 = [unit(0.2, 1), unit(1, 1), unit(-0.5, -1)]
    k1 = [unit(1, 0.1), unit(0.5, 1), unit(-1, 0.3)]
    k2 = [unit(0.9, -0.2), unit(0.3, 0.9), unit(0, 1)]

    def ctr(q, k):
        # 2T * mean_i -log softmax_j(q_i.k_j / T)[i]
        losses = []
        for i in range(len(q)):
            logits = [dot(q[i], k[j]) / temp for j in range(len(k))]
            logits = [logits[i]] + logits[:i] + logits[i + 1:]   # positive first
            losses.append(neg_log_softmax0(logits))
        return 2 * temp * sum(losses) / len(losses)

    exp = 0.5 * (ctr(q1, k2) + ctr(q2, k1))
    got = infonce_loss(T(q1), T(q2), T(k1), T(k2), infonce_t=temp)
    assert got.item() == pytest.approx(exp, abs=1e-12)


INFONCE_RANKS = """
from loss import infonce_loss

def main(rank, world):
    g = torch.Generator().manual_seed(0)                     # the same joint batch on every rank
    q1, q2, k1, k2 = (torch.nn.functional.normalize(torch.randn(world * 4, 8, generator=g), dim=1) for _ in range(4))
    mine = slice(4 * rank, 4 * rank + 4)
    return float(infonce_loss(q1[mine], q2[mine], k1[mine], k2[mine], infonce_t=0.5))
"""


def test_infonce_on_two_ranks_is_one_process_on_the_joint_batch(tmp_path):
    """MoCo v3 under DDP: each rank's queries score against every rank's keys, and its
    positives sit at the offset of its own keys in the gathered set (labels + B x rank); the
    mean over ranks is then the one-process loss on the joint batch."""
    from conftest import gloo_ranks
    per_rank = gloo_ranks(tmp_path, INFONCE_RANKS)
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=1) for _ in range(4))
    joint = float(infonce_loss(q1, q2, k1, k2, infonce_t=0.5))
    assert sum(per_rank) / 2 == pytest.approx(joint, rel=1e-6)
    assert per_rank[0] != pytest.approx(per_rank[1])          # two different halves, two different losses


def test_infonce_default_temperature_is_one_and_no_grad_into_k():
    q1, q2, k1, k2 = _views()
    k1.requires_grad_(), k2.requires_grad_()
    a = infonce_loss(q1, q2, k1, k2)
    b = infonce_loss(q1, q2, k1, k2, infonce_t=1.0)
    assert a.item() == b.item()
    a.backward()
    assert k1.grad is None and k2.grad is None
    assert q1.grad is not None and q2.grad is not None


# ---------------------------------------------------------------- eq. 14 negative centroids

def ref_neg_centroids(q, mu, kappa, pos, temp):
    out = []
    for i, p in enumerate(pos):
        logits = [kappa[p] * dot(mu[p], q[i]) / temp]
        logits += [kappa[j] * dot(mu[j], q[i]) / temp for j in range(len(mu)) if j != p]
        out.append(neg_log_softmax0(logits))
    return sum(out) / len(out)


def test_neg_centroids_hand_computed():
    temp = 0.2
    nbr = torch.tensor([[0], [3]])
    got = cluster_loss_neg_centroids(T(Q), None, A(T(MU), T(KAPPA), nbr), num_neg=100, neg_t=temp)
    exp = ref_neg_centroids(Q, MU, KAPPA, [0, 3], temp)
    assert got.item() == pytest.approx(exp, abs=1e-10)
    # the positive is excluded from the negatives: counting it there too gives another number
    with_pos = sum(neg_log_softmax0([KAPPA[p] * dot(MU[p], Q[i]) / temp]
                                    + [KAPPA[j] * dot(MU[j], Q[i]) / temp for j in range(4)])
                   for i, p in enumerate([0, 3])) / 2
    assert abs(with_pos - exp) > 1e-3
    # with s > 1 only the first neighbour is the positive
    nbr3 = torch.tensor([[0, 2, 1], [3, 1, 2]])
    got3 = cluster_loss_neg_centroids(T(Q), None, A(T(MU), T(KAPPA), nbr3), num_neg=100, neg_t=temp)
    assert got3.item() == pytest.approx(exp, abs=1e-10)


def test_neg_centroids_subsampled_negatives():
    """num_neg < K: PCL's random subset of negative centroids, drawn per batch from torch's RNG
    (randperm(K)[:num_neg]), the positive masked out where the draw holds it."""
    nbr, pos, temp = torch.tensor([[0], [3]]), [0, 3], 0.2
    full = ref_neg_centroids(Q, MU, KAPPA, pos, temp)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        neg = torch.randperm(len(MU))[:2].tolist()
        want = sum(neg_log_softmax0([KAPPA[p] * dot(MU[p], Q[i]) / temp]
                                    + [KAPPA[j] * dot(MU[j], Q[i]) / temp for j in neg if j != p])
                   for i, p in enumerate(pos)) / 2
        torch.manual_seed(seed)
        got = cluster_loss_neg_centroids(T(Q), None, A(T(MU), T(KAPPA), nbr), num_neg=2, neg_t=temp).item()
        assert got == pytest.approx(want, abs=1e-10), seed
        seen.add(round(got, 8))
    assert len(seen) > 2 and all(abs(v - full) > 1e-6 for v in seen)   # subsets, not all the negatives


def test_neg_centroids_gradients_and_single_cluster():
    q, mu, kap = T(Q, grad=True), T(MU, grad=True), T(KAPPA, grad=True)
    cluster_loss_neg_centroids(q, None, A(mu, kap, [[0], [3]]), neg_t=0.2).backward()
    assert mu.grad is None and kap.grad is None and torch.isfinite(q.grad).all()
    # K = 1: no negatives at all, the loss is 0 (and not NaN)
    q = T(Q, grad=True)
    l = cluster_loss_neg_centroids(q, None, A(T(MU[:1]), T(KAPPA[:1]), [[0], [0]]))
    l.backward()
    assert l.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- eq. 15 negative instances

def ref_neg_instances(q, k, mu, kappa, pos, temp):
    out = []
    for i, p in enumerate(pos):
        logits = [kappa[p] * dot(mu[p], q[i]) / temp]
        logits += [dot(q[i], k[j]) / temp for j in range(len(k)) if pos[j] != p]
        out.append(neg_log_softmax0(logits))
    return sum(out) / len(out)


def test_neg_instances_hand_computed():
    temp = 0.3
    q = [unit(0.7, 0.2, -0.3), unit(-0.2, 0.9, 0.4), unit(0.5, 0.5, 0.5), unit(0.1, -0.3, 0.9)]
    k = [unit(0.6, 0.3, -0.2), unit(-0.1, 0.8, 0.5), unit(0.4, 0.6, 0.4), unit(0.2, -0.2, 1.0)]
    pos = [0, 1, 0, 3]
    nbr = torch.tensor([[c, 2] for c in pos])      # only the first neighbour counts
    got = cluster_loss_neg_instances(T(q), T(k), A(T(MU), T(KAPPA), nbr), neg_t=temp)
    exp = ref_neg_instances(q, k, MU, KAPPA, pos, temp)
    assert got.item() == pytest.approx(exp, abs=1e-10)
    # same-cluster instances (and the sample itself) are excluded: with them it differs
    naive = sum(neg_log_softmax0([KAPPA[p] * dot(MU[p], q[i]) / temp]
                                 + [dot(q[i], k[j]) / temp for j in range(4) if j != i])
                for i, p in enumerate(pos)) / 4
    assert abs(naive - exp) > 1e-3


def test_neg_instances_gradients_and_one_cluster():
    q, k = T(Q, grad=True), T(Z, grad=True)
    mu, kap = T(MU, grad=True), T(KAPPA, grad=True)
    cluster_loss_neg_instances(q, k, A(mu, kap, [[0], [1]])).backward()
    assert k.grad is None and mu.grad is None and kap.grad is None
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    # whole batch in one cluster: no negatives, loss 0, gradients finite
    q = T(Q, grad=True)
    l = cluster_loss_neg_instances(q, T(Z), A(T(MU), T(KAPPA), [[1], [1]]))
    l.backward()
    assert l.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kw", [dict(a=None), dict(cluster_weight=0.0)])
def test_siammm_loss_nothing_to_train_raises(kw):
    # instance="none" with no cluster term has no gradient at all: a clear ValueError rather
    # than autograd's "element 0 of tensors does not require grad" at backward()
    q1, q2, k1, k2 = _views()
    args = dict(a=A(T(MU), T(KAPPA), NBR, T(ref_weights(Z, MU, KAPPA, NBR, 0.7))), instance="none")
    args.update(kw)
    with pytest.raises(ValueError):
        siammm_loss(q1, q2, k1, k2, **args)
