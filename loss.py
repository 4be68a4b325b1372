"""
Every loss of SiamMM, one function each, with the equation it implements.

    instance_loss        eq. 12       D(q, sg(k)) = 2 - 2 q.k (eq. 1), symmetrised, no negatives
    cluster_loss         eq. 9        -sum_k w_ik kappa_k mu_k.q_i   (vMF log-likelihood)
    siammm_loss          eq. 13       L_inst + lambda_c L_clus
  ablations (sec. 6, Tables 4 and 8):
    infonce_loss         "SiamMM w/ negative inst" (Table 4): MoCo v3 InfoNCE instead of eq. 12
    cluster_loss_neg_centroids   eq. 14 (PCL ProtoNCE style, Table 8)
    cluster_loss_neg_instances   eq. 15 (Table 8)

INSTANCE_LOSSES and CLUSTER_LOSSES name them for --instance-loss and --cluster-loss (train.py
reads its choices from them). Each loss takes its own settings by keyword and ignores the
rest: siammm_loss passes every flag of the run, so a new variant is a function and its entry
in a table, and a setting of its own is one more flag in train.py.

Conventions: q (B x D) are online predictions, unit norm, with gradient; k (B x D) are
momentum targets, unit norm, no gradient. `a` is the batch's cluster.Assignment, this
epoch's fixed estimates: centroids mu (K x D), kappa (K,) normalised to mean 1, and each
sample's s nearest centroid ids nbr (B x s) with their eq. 10 weights w (B x s). None of
them carries a gradient (eq. 9).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils import gather_rows


# ----------------------------------------------------------------------------- instance losses (eq. 1, 12)
def instance_loss(q1, q2, k1, k2, **_):
    """Eq. 12: 1/2 [D(q1, sg(k2)) + D(q2, sg(k1))], the symmetrised form of eq. 1.

    Eq. 1: D(a, b) = 2 - 2 a.b, the distance in the Siamese loss D(q, sg(k)). For unit
    vectors 2 - 2 a.b = ||a - b||^2: BYOL's loss, with MoCo v3's momentum targets.
    """
    return 0.5 * ((2 - 2 * (q1 * k2.detach()).sum(1)).mean() + (2 - 2 * (q2 * k1.detach()).sum(1)).mean())


def infonce_loss(q1, q2, k1, k2, infonce_t=1.0, **_):
    """"SiamMM w/ negative inst" (Table 4, row 4): MoCo v3's contrastive loss in place of
    eq. 12. Every other image's momentum key, on every GPU, is a negative.

    ctr(q, k) = 2T * CE(q k_all^T / T, own index), symmetrised as in MoCo v3 (T = 1.0 is
    MoCo v3's ResNet setting; the 2T factor keeps the gradient scale independent of T).
    Under DDP each rank's keys sit at rows B x rank ... B x rank + B - 1 of k_all, so its
    positives are at labels + B x rank."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    B = q1.shape[0]
    labels = torch.arange(B, device=q1.device) + B * rank
    own = labels.cpu()

    def ctr(q, k):
        k_all = gather_rows(k.detach(), own, B * world)       # every rank's keys, in rank order
        return F.cross_entropy(q @ k_all.T / infonce_t, labels) * (2 * infonce_t)
    return 0.5 * (ctr(q1, k2) + ctr(q2, k1))


def no_instance_loss(q1, q2, k1, k2, **_):
    """'SiamMM w/o i' (Table 4): no instance term, the cluster loss alone."""
    return q1.new_zeros(())


INSTANCE_LOSSES = {"byol": instance_loss, "infonce": infonce_loss, "none": no_instance_loss}


# ----------------------------------------------------------------------------- cluster losses (eq. 9, 14, 15)
def cluster_loss(q, k, a, **_):
    """Eq. 9: L_clus = -1/B sum_i sum_{k in N_i} w_ik kappa_k mu_k.q_i.

    The negative log-likelihood of q_i under the fixed vMF mixture, each component's term
    weighted by the soft assignment w_ik (eq. 10). log C_D(kappa_k) does not depend on q and
    drops. mu and kappa carry no gradient (they are this epoch's estimates, eq. 6, 7 / 16);
    kappa is passed normalised to mean 1 over clusters, so the scale does not depend on D.
    k is not used (the other view's key, which eq. 15 takes).
    """
    mu = a.centroids.detach()[a.nbr]                   # B x s x D
    kap = a.kappa.detach()[a.nbr]                      # B x s
    cos = torch.einsum("bd,bsd->bs", q, mu)            # mu_k . q_i
    return -(a.w.detach() * kap * cos).sum(1).mean()


def cluster_loss_neg_centroids(q, k, a, num_neg=16000, neg_t=0.2, **_):
    """Eq. 14: PCL's ProtoNCE with vMF concentrations (Table 8), s = 1 as in the paper:

        -log exp(kappa_p mu_p.q / T) / (exp(kappa_p mu_p.q / T) + sum_{j in neg} exp(kappa_j mu_j.q / T))

    p = nbr[:, 0] is the sample's own centroid; the negatives are num_neg centroids drawn at
    random per batch (all other centroids when K <= num_neg), the positive masked out of them.
    T is --neg-t.
    """
    K = a.centroids.shape[0]
    pos = a.nbr[:, 0]
    neg = torch.randperm(K, device=q.device)[:num_neg] if K > num_neg else torch.arange(K, device=q.device)
    mu, kap = a.centroids.detach(), a.kappa.detach()
    pos_logit = kap[pos] * (q * mu[pos]).sum(1) / neg_t                           # B
    neg_logit = kap[neg] * (q @ mu[neg].T) / neg_t                                # B x r
    neg_logit = neg_logit.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos))


def cluster_loss_neg_instances(q, k, a, neg_t=0.2, **_):
    """Eq. 15: the positive centroid against negative *instances* (Table 8): the momentum
    embeddings k_j of the other images in the batch that sit in a different cluster.

        -log exp(kappa_p mu_p.q / T) / (exp(kappa_p mu_p.q / T) + sum_{j: c_j != c_i} exp(q.k_j / T))
    """
    pos = a.nbr[:, 0]
    mu, kap = a.centroids.detach(), a.kappa.detach()
    pos_logit = kap[pos] * (q * mu[pos]).sum(1) / neg_t
    neg_logit = q @ k.detach().T / neg_t                                          # B x B
    neg_logit = neg_logit.masked_fill(pos[None, :] == pos[:, None], float("-inf"))  # same cluster (and self)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(pos))


CLUSTER_LOSSES = {"mle": cluster_loss, "neg-centroids": cluster_loss_neg_centroids,
                  "neg-instances": cluster_loss_neg_instances}


# ----------------------------------------------------------------------------- the final loss (eq. 13)
def siammm_loss(q1, q2, k1, k2, a=None, instance="byol", cluster="mle", cluster_weight=1.0, **flags):
    """Eq. 13: L = L_inst + lambda_c L_clus, the cluster term averaged over both views.

    instance: a key of INSTANCE_LOSSES ("byol": eq. 12; "infonce": Table 4 "w/ negative
    inst"; "none": "SiamMM w/o i"). cluster: a key of CLUSTER_LOSSES ("mle": eq. 9;
    "neg-centroids": eq. 14; "neg-instances": eq. 15). a: the batch's Assignment, None in
    cluster warm-up epochs (no mixture yet): then only L_inst. Each view's prediction is
    paired with the other view's key, as eq. 12 pairs q1 with k2; both views of image i share
    its assignment (one E-step per image per epoch). flags: the losses' own settings
    (infonce_t, neg_t, num_neg, ...). Returns the total and the two terms (detached) for the log.
    """
    l_inst = INSTANCE_LOSSES[instance](q1, q2, k1, k2, **flags)
    if a is None or cluster_weight == 0:
        # no instance term and no cluster term: a constant with no gradient, and backward()
        # would fail with an opaque autograd error; say what is wrong instead
        if instance == "none":
            raise ValueError("instance loss 'none' needs the cluster loss, but there is no cluster term "
                             "(cluster warm-up epoch or cluster weight 0): nothing to train on")
        l_clus = q1.new_zeros(())
    else:
        fn = CLUSTER_LOSSES[cluster]
        l_clus = 0.5 * (fn(q1, k2, a, **flags) + fn(q2, k1, a, **flags))
    return l_inst + cluster_weight * l_clus, l_inst.detach(), l_clus.detach()
