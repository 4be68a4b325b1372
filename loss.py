"""
Every loss of SiamMM, one function each, with the equation it implements.

    instance_loss        eq. 1, 12    D(q, sg(k)) = 2 - 2 q.k, symmetrised, no negatives
    cluster_loss         eq. 9        -sum_k w_ik kappa_k mu_k.q_i   (vMF log-likelihood)
    siammm_loss          eq. 13       L_inst + lambda_c L_clus
  ablations (sec. 6, Tables 4 and 8):
    infonce_loss         "SiamMM w/ negative inst" (Table 4): MoCo v3 InfoNCE instead of eq. 12
    cluster_loss_neg_centroids   eq. 14 (PCL ProtoNCE style, Table 8)
    cluster_loss_neg_instances   eq. 15 (Table 8)

Conventions: q (B x D) are online predictions, unit norm, with gradient; k (B x D) are
momentum targets, unit norm, no gradient; centroids mu (K x D) and concentrations kappa
(K,) are fixed estimates of this epoch's mixture (they carry no gradient, eq. 9).
nbr (B x s) are each sample's s nearest centroid ids, w (B x s) its eq. 10 weights: the
E-step's output (cluster.py computes both, once per epoch, from the momentum features).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def instance_loss(q1, q2, k1, k2):
    """Eq. 1, 12: 1/2 [D(q1, sg(k2)) + D(q2, sg(k1))] with D(a, b) = 2 - 2 a.b (eq. 1).

    For unit vectors 2 - 2 a.b = ||a - b||^2: BYOL's loss, with MoCo v3's momentum targets.
    """
    return 0.5 * ((2 - 2 * (q1 * k2.detach()).sum(1)).mean() + (2 - 2 * (q2 * k1.detach()).sum(1)).mean())


@torch.no_grad()
def concat_all_gather(x):
    """All ranks' x stacked in rank order (no gradient); x itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def infonce_loss(q1, q2, k1, k2, temperature=1.0):
    """"SiamMM w/ negative inst" (Table 4, row 4): MoCo v3's contrastive loss in place of
    eq. 12. Every other image's momentum key, on every GPU, is a negative.

    ctr(q, k) = 2T * CE(q k_all^T / T, own index), symmetrised as in MoCo v3 (T = 1.0 is
    MoCo v3's ResNet setting; the 2T factor keeps the gradient scale independent of T)."""
    def ctr(q, k):
        k_all = concat_all_gather(k.detach())
        logits = q @ k_all.T / temperature
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2 * temperature)
    return 0.5 * (ctr(q1, k2) + ctr(q2, k1))


def cluster_loss(q, centroids, kappa, nbr, w):
    """Eq. 9: L_clus = -1/B sum_i sum_{k in N_i} w_ik kappa_k mu_k.q_i.

    The negative log-likelihood of q_i under the fixed vMF mixture, each component's term
    weighted by the soft assignment w_ik (eq. 10). log C_D(kappa_k) does not depend on q and
    drops. mu and kappa carry no gradient (they are this epoch's estimates, eq. 6, 7 / 16);
    kappa is passed normalised to mean 1 over clusters, so the scale does not depend on D.
    """
    mu = centroids.detach()[nbr]                       # B x s x D
    kap = kappa.detach()[nbr]                          # B x s
    cos = torch.einsum("bd,bsd->bs", q, mu)            # mu_k . q_i
    return -(w.detach() * kap * cos).sum(1).mean()


def cluster_loss_neg_centroids(q, centroids, kappa, nbr, num_neg=16000, temperature=0.2):
    """Eq. 14: PCL's ProtoNCE with vMF concentrations (Table 8), s = 1 as in the paper:

        -log exp(kappa_p mu_p.q / T) / (exp(kappa_p mu_p.q / T) + sum_{j in neg} exp(kappa_j mu_j.q / T))

    p = nbr[:, 0] is the sample's own centroid; the negatives are num_neg centroids drawn at
    random per batch (all other centroids when K <= num_neg), the positive masked out of them.
    """
    K = centroids.shape[0]
    pos = nbr[:, 0]
    neg = torch.randperm(K, device=q.device)[:num_neg] if K > num_neg else torch.arange(K, device=q.device)
    mu, kap = centroids.detach(), kappa.detach()
    pos_logit = kap[pos] * (q * mu[pos]).sum(1) / temperature                     # B
    neg_logit = kap[neg] * (q @ mu[neg].T) / temperature                          # B x r
    neg_logit = neg_logit.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos))


def cluster_loss_neg_instances(q, k, centroids, kappa, nbr, temperature=0.2):
    """Eq. 15: the positive centroid against negative *instances* (Table 8): the momentum
    embeddings k_j of the other images in the batch that sit in a different cluster.

        -log exp(kappa_p mu_p.q / T) / (exp(kappa_p mu_p.q / T) + sum_{j: c_j != c_i} exp(q.k_j / T))
    """
    pos = nbr[:, 0]
    mu, kap = centroids.detach(), kappa.detach()
    pos_logit = kap[pos] * (q * mu[pos]).sum(1) / temperature
    neg_logit = q @ k.detach().T / temperature                                   # B x B
    neg_logit = neg_logit.masked_fill(pos[None, :] == pos[:, None], float("-inf"))  # same cluster (and self)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos))


def siammm_loss(q1, q2, k1, k2, centroids=None, kappa=None, nbr=None, w=None,
                cluster_weight=1.0, instance="byol", cluster="mle",
                infonce_t=1.0, neg_t=0.2, num_neg=16000):
    """Eq. 13: L = L_inst + lambda_c L_clus, the cluster term averaged over both views.

    instance: "byol" (eq. 12), "infonce" (Table 4 "w/ negative inst"), "none" ("SiamMM w/o i",
    Table 4). cluster: "mle" (eq. 9), "neg-centroids" (eq. 14), "neg-instances" (eq. 15).
    With centroids=None (no mixture yet: cluster warm-up epochs) only L_inst is used.
    Both views of image i share its assignment nbr_i, w_i (one E-step per image per epoch).
    Returns the total and the two terms (detached) for logging.
    """
    zero = q1.new_zeros(())
    if instance == "byol":
        l_inst = instance_loss(q1, q2, k1, k2)
    elif instance == "infonce":
        l_inst = infonce_loss(q1, q2, k1, k2, infonce_t)
    elif instance == "none":
        l_inst = zero
    else:
        raise ValueError(f"unknown instance loss {instance!r}: byol, infonce or none")
    if centroids is None or cluster_weight == 0:
        l_clus = zero
    elif cluster == "mle":
        l_clus = 0.5 * (cluster_loss(q1, centroids, kappa, nbr, w) + cluster_loss(q2, centroids, kappa, nbr, w))
    elif cluster == "neg-centroids":
        l_clus = 0.5 * (cluster_loss_neg_centroids(q1, centroids, kappa, nbr, num_neg, neg_t)
                        + cluster_loss_neg_centroids(q2, centroids, kappa, nbr, num_neg, neg_t))
    elif cluster == "neg-instances":
        # each view's prediction against the other view's keys, like eq. 12 pairs q1 with k2
        l_clus = 0.5 * (cluster_loss_neg_instances(q1, k2, centroids, kappa, nbr, neg_t)
                        + cluster_loss_neg_instances(q2, k1, centroids, kappa, nbr, neg_t))
    else:
        raise ValueError(f"unknown cluster loss {cluster!r}: mle, neg-centroids or neg-instances")
    # With no instance term and no cluster term the total is a constant with no gradient, and
    # backward() would fail with an opaque autograd error: say what is wrong instead.
    if instance == "none" and (centroids is None or cluster_weight == 0):
        raise ValueError("instance loss 'none' needs the cluster loss, but there is no cluster term "
                         "(cluster warm-up epoch or cluster weight 0): nothing to train on")
    return l_inst + cluster_weight * l_clus, l_inst.detach(), l_clus.detach()
