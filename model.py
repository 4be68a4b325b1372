"""
The Siamese networks of SiamMM (sec. 3.1 and 5.1 of the paper; the MoCo v3 recipe).

    online branch    x -> f (backbone) -> g (3-layer projector) -> h (2-layer predictor) -> q
    momentum branch  x -> f_m          -> g_m                                          -> k

q and k are L2-normalised 256-d vectors on the unit sphere: the space in which cluster.py
fits its von Mises-Fisher mixture. f_m, g_m are an exponential moving average (EMA) of f, g
and never receive a gradient (the stop-gradient sg(.) of eq. 1 / 12).

The backbone f is any torchvision classification network without its classifier, passed to
SiamMM as a constructor (MoCo v3 passes its base encoder the same way); ModelConfig holds
the shape. Everything is plain torch.nn, so that the exported backbone (export_backbone)
loads into torchvision.models.<arch>() unchanged (at the default width 64, ImageNet stem).
"""

import contextlib
import copy
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import run_safety
from cluster import VMFMixture
from utils import UserError


# Every torchvision classifier (torchvision.models.list_models(module=torchvision.models)),
# by its family: the module that builds it (torchvision.models.<family>). Each family runs
# from the smallest --img-size here: below it a pooling layer or an unpadded strided conv
# (a stem, a patchify, a downsampling) would get an empty feature map. Found with a forward
# pass at every size from 1 px; tests/test_arch.py checks each classifier at its minimum.
# torchvision's weights give the same min_size, but 224 for Swin and 33 for EfficientNet-V2
# (the sizes they were tried at: both run smaller) and 17 for squeezenet1_1.
MIN_SIZE = {"resnet": 1, "regnet": 1, "efficientnet": 1, "mobilenetv2": 1, "mobilenetv3": 1, "mnasnet": 1,
            "shufflenetv2": 1,       # padded convs and adaptive pooling only: any size
            "swin_transformer": 4,   # the 4x4 patchify; later windows and patch merges pad
            "googlenet": 15, "squeezenet": 21, "densenet": 29, "vgg": 32, "convnext": 32, "alexnet": 63,
            "inception": 75}         # torchvision's docs: inception_v3 takes at least 75 x 75
# A ViT's position embedding (image_size) and a MaxViT's attention grid (input_size) are
# sized when torchvision builds them, at its default 224 px: they run at that size only.
FIXED_SIZE = {"vision_transformer": 224, "maxvit": 224}
ARCH_HELP = ("a torchvision classifier: resnet*, resnext*, wide_resnet* (the only ones with --small-stem and --width), "
             "regnet_*, efficientnet_*, mobilenet_*, mnasnet*, shufflenet_* at any --img-size; from 4 px swin_*, "
             "15 googlenet, 21 squeezenet*, 29 densenet*, 32 vgg* and convnext_*, 63 alexnet, 75 inception_v3; "
             "vit_* and maxvit_t at 224 only")


def family(arch):
    """torchvision's module for --arch: resnet (also resnext*, wide_resnet*), vgg, ..."""
    return torchvision.models.get_model_builder(arch).__module__.rsplit(".", 1)[-1]


def is_resnet(arch):
    """A ResNet, ResNeXt or Wide-ResNet: the networks with --small-stem and --width."""
    return arch in torchvision.models.list_models(module=torchvision.models) and family(arch) == "resnet"


def check_arch(arch, small_stem=False, width=64, img_size=None):
    """Refuse, in one line (UserError), an --arch this code cannot train with these options:
    train.py calls it among its flag checks, before any data is loaded; build_backbone again
    (img_size=None: the size is not checked). Any network takes 1-channel images."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown --arch {arch!r}: {ARCH_HELP}")
    fam = family(arch)
    if fam not in MIN_SIZE and fam not in FIXED_SIZE:   # a family added to torchvision after this table
        raise UserError(f"--arch {arch}: torchvision's {fam} networks are untested here; use {ARCH_HELP}")
    if not is_resnet(arch) and (small_stem or width != 64):
        raise UserError(f"--arch {arch}: --small-stem and --width are options of the ResNets (resnet*, resnext*, "
                        "wide_resnet*); drop them (--no-small-stem --width 64) or use --arch resnet18")
    if img_size is None:
        return
    if fam in FIXED_SIZE and img_size != FIXED_SIZE[fam]:
        raise UserError(f"--arch {arch} runs at --img-size {FIXED_SIZE[fam]} only (torchvision fixes its input size "
                        f"when it builds it), not {img_size}; for small images use e.g. --arch resnet18 --small-stem")
    if img_size < MIN_SIZE.get(fam, 1):   # (a fixed size passed above)
        raise UserError(f"--arch {arch} needs --img-size {MIN_SIZE[fam]} or more, not {img_size} (its feature map "
                        "would be empty); at any size: resnet* (--small-stem for 28-64 px), regnet_*, efficientnet_*, "
                        "mobilenet_*, mnasnet*, shufflenet_*")


def build_backbone(arch="resnet50", small_stem=False, in_chans=3, width=64):
    """A torchvision classification network (--arch: resnet50, resnet18, convnext_tiny,
    vit_b_16, ...; check_arch says which, with which options) without its classifier;
    returns (module, feature dimension). The classifier, the network's last nn.Linear,
    becomes an Identity; its place is kept in module.classifier_path, where lincls.py puts
    its own.

    Three options for ResNets (the networks of the paper and the CPU default):
    small_stem: for 28-64 px images (Fashion-MNIST, CIFAR) the ImageNet stem (7x7 conv
    stride 2 + max-pool) throws away 3/4 of a 32 px image before the first block; the usual
    fix (SimCLR's CIFAR recipe, solo-learn) is a 3x3 stride-1 conv and no max-pool.
    in_chans: 1 for grayscale data, so no channel is replicated three times (every network).
    width: channels of the stem and the first stage; the four stages have width x (1, 2, 4,
    8) x the block's expansion, as in torchvision (64) and SimCLR's wider ResNets (128 =
    its "2x"). torchvision builds only 64, so for another width the stem and stages are
    rebuilt from torchvision's own blocks (ResNet._make_layer): the module names, forward
    and state_dict keys stay torchvision's. The CPU default uses 16: at a budget of
    minutes, images per second matter more than capacity.
    Every conv and BN of a ResNet then gets torchvision's initialisation, zero_init_residual
    included: the last BN of every residual block starts at zero, so each block starts as
    the identity (Goyal et al.; used by MoCo v3 and SimSiam).
    """
    check_arch(arch, small_stem, width)
    if width < 1:
        raise ValueError(f"--width {width}: the first stage needs at least 1 channel (torchvision: 64)")
    # GoogLeNet and Inception v3 return a namedtuple with auxiliary classifiers' logits in
    # training mode unless built without them (init_weights: their current default, said
    # aloud so that torchvision does not warn)
    kw = dict(aux_logits=False, init_weights=True) if family(arch) in ("googlenet", "inception") else {}
    net = torchvision.models.get_model(arch, weights=None, **kw)
    if not isinstance(net, torchvision.models.ResNet):
        return headless(net, in_chans)
    block = type(net.layer1[0])   # BasicBlock (resnet18/34) or Bottleneck (resnet50/101/152)
    if width != 64:
        depth = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
        net.inplanes = width   # _make_layer reads and advances it, stage by stage
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(block, width, depth[0])
        net.layer2 = net._make_layer(block, 2 * width, depth[1], stride=2)
        net.layer3 = net._make_layer(block, 4 * width, depth[2], stride=2)
        net.layer4 = net._make_layer(block, 8 * width, depth[3], stride=2)
    if small_stem:
        net.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3 or width != 64:
        net.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
    for m in net.modules():   # torchvision.models.ResNet.__init__'s initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():   # zero_init_residual: each block's last BN (after the loop above, which sets it to 1)
        if isinstance(m, block):
            nn.init.zeros_(getattr(m, "bn3", m.bn2).weight)
    net.fc = nn.Identity()  # the backbone ends at global average pooling: 8 x width x expansion (r18: 512, r50: 2048)
    net.classifier_path = "fc"
    return net, 8 * width * block.expansion


def headless(net, in_chans):
    """build_backbone for a network other than a ResNet: (net without its classifier, the
    feature dimension), for in_chans-channel images."""
    for name, m in list(net.named_modules()):
        # torchvision puts dropout (p > 0) only in its classifiers: with their last Linear
        # gone it would drop features on their way to the projector, and to the momentum
        # branch's targets k; MoCo v3 and SimSiam have none there.
        if isinstance(m, nn.Dropout):
            net.set_submodule(name, nn.Identity())
    if isinstance(net, torchvision.models.SqueezeNet):
        # its classifier is a 1x1 conv to class maps, then average pooling: no Linear. The
        # features are the pooled maps before it; torchvision's forward flattens them.
        dim = net.classifier[1].in_channels
        net.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Identity())
        head = "classifier.2"
    else:
        head = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
        dim = net.get_submodule(head).in_features
    net.set_submodule(head, nn.Identity())
    net.classifier_path = head
    if in_chans != 3:
        # The stem is the first conv torchvision registers. Its kernels over the 3 input
        # channels are summed (and shared out over in_chans): a gray image then gives the
        # features the torchvision network gives on it repeated thrice, at the same scale
        # (timm's adapt_input_conv does the same for 1 channel).
        stem = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        w = stem.weight.detach().sum(1, keepdim=True)
        stem.weight = nn.Parameter(w.repeat(1, in_chans, 1, 1) / in_chans)
        stem.in_channels = in_chans
    return net, dim


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn):
    """Linear-BN-ReLU blocks, then a last Linear (+ BN without affine if last_bn).

    This is the MoCo v3 head: no linear layer has a bias (those that feed a BN would have it
    cancelled by the BN; MoCo v3 drops it from the predictor's output layer as well).
    The projector's last BN has no affine parameters (sec. 5.1, MoCo v3), the
    predictor's output has no BN at all.
    """
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


@contextlib.contextmanager
def batch_statistics(*modules, process_group=None):
    """Within the block, every BN of `modules` normalises with the current batch's own
    statistics (as in training) and leaves its running statistics untouched.

    A BN in training mode with track_running_stats off is exactly that in torch. A
    SyncBatchNorm would all-reduce the statistics across ranks, which hangs when ranks run
    different numbers of batches (the feature pass) and makes z depend on the world size:
    it is given `process_group`, a group of this rank alone (train.py makes it), instead."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats, getattr(m, "process_group", None)) for m in bns]
    for m in bns:
        m.training, m.track_running_stats = True, False
        if isinstance(m, nn.SyncBatchNorm):
            m.process_group = process_group
    try:
        yield
    finally:
        for m, (training, track, group) in zip(bns, saved):
            m.training, m.track_running_stats = training, track
            if isinstance(m, nn.SyncBatchNorm):
                m.process_group = group


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a SiamMM (as nanoGPT's GPTConfig): train.py makes it from its flags and
    the data's channels, every checkpoint saves it, evaluate.py and lincls.py rebuild the
    model from it, and a resumed run must have the same."""
    arch: str = "resnet50"
    small_stem: bool = False
    in_chans: int = 3
    width: int = 64
    proj_hidden: int = 4096
    pred_hidden: int = 4096
    dim: int = 256

    def build(self):
        """The SiamMM of this shape, its backbone constructor passed in."""
        backbone = functools.partial(build_backbone, self.arch, self.small_stem, self.in_chans, self.width)
        return SiamMM(backbone, self.proj_hidden, self.pred_hidden, self.dim)


class SiamMM(nn.Module):
    """Online encoder f, g, predictor h, and the momentum encoder f_m, g_m (sec. 3.1).

    backbone: a constructor that returns (f, its feature dimension), e.g. build_backbone
    with its options bound (ModelConfig.build); another network is another constructor."""

    def __init__(self, backbone, proj_hidden=4096, pred_hidden=4096, dim=256):
        super().__init__()
        self.backbone, self.feat_dim = backbone()
        self.projector = mlp(3, self.feat_dim, proj_hidden, dim, last_bn=True)    # g: 3 layers
        self.predictor = mlp(2, dim, pred_hidden, dim, last_bn=False)             # h: 2 layers
        # f_m, g_m start as exact copies and are only ever changed by update_momentum().
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad = False

    def momentum_parameters(self):
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    def online_parameters(self):
        """Parameters the optimiser updates: f, g, h (never the momentum copies)."""
        return [p for n, p in self.named_parameters() if not n.startswith("momentum_")]

    @torch.no_grad()
    def update_momentum(self, m):
        """EMA step, per iteration: theta_m <- m theta_m + (1 - m) theta (MoCo v3)."""
        online = list(self.backbone.parameters()) + list(self.projector.parameters())
        torch._foreach_mul_(self.momentum_parameters(), m)
        torch._foreach_add_(self.momentum_parameters(), online, alpha=1.0 - m)

    def forward(self, x1, x2):
        """Both views through both branches. Returns q1, q2 (online, with grad) and
        k1, k2 (momentum, no grad), all L2-normalised: the inputs of eq. 12 and eq. 9.

        Each view goes through each branch in its own pass, so BN statistics are computed
        per view, as in MoCo v3.
        """
        q1 = F.normalize(self.predictor(self.projector(self.backbone(x1))), dim=1)
        q2 = F.normalize(self.predictor(self.projector(self.backbone(x2))), dim=1)
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_backbone(x1)), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_backbone(x2)), dim=1)
        return q1, q2, k1, k2

    @torch.no_grad()
    def embed(self, x, bn="batch", group=None):
        """z = normalize(g_m(f_m(x))): the momentum feature that the mixture model is fit
        on each epoch (sec. 5.1; PCL and ProPos also cluster momentum features).

        bn="batch" (default): every BN normalises with the statistics of this batch, exactly
        as the momentum branch does when it makes the training targets k, so the centroids
        live where q is pulled (eq. 9); running statistics are neither used nor changed.
        bn="running": eval-mode running statistics. Those were accumulated on augmented
        crops, not on the clean images of the feature pass, and the mismatch pushes every z
        into a narrow cone, where k-means makes one giant cluster and eq. 9 then pulls every
        q towards the cone's axis: the embedding collapses within an epoch (bench/RESULTS.md,
        "The BN statistics of the feature pass").
        Batches need at least 2 images for "batch" (data.feature_batches guarantees it, and
        cuts them from a permutation: a class-sorted batch would lose its class's mean);
        group: this rank's own process group when the model has SyncBatchNorm layers."""
        stats = (contextlib.nullcontext() if bn == "running" else
                 batch_statistics(self.momentum_backbone, self.momentum_projector, process_group=group))
        with stats:
            return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1)

    def export_backbone(self, encoder="online"):
        """The online backbone f (or the momentum f_m) as a state_dict for
        torchvision.models.<arch>(): every key except the classifier's (fc for a ResNet: load
        with strict=False and check that only fc.* is missing). evaluate.py --export-backbone
        writes it."""
        net = self.backbone if encoder == "online" else self.momentum_backbone
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- a pre-trained model to measure
# evaluate.py and lincls.py read a train.py checkpoint (--checkpoint) or an exported backbone
# (--backbone: a backbone state_dict, written by evaluate.py --export-backbone) through these.
def load_pretrained(args, device):
    """The backbone to measure, its feature dimension, the embedding the mixture was fit on
    (or None), the mixture (or None) and the training flags, from --checkpoint or --backbone.
    Sets args.data, data_dir, img_size, arch from the checkpoint where no flag gave them."""
    if args.checkpoint:
        model, mixture, train_args = load_checkpoint(args)
        model = model.to(device)
        backbone = model.backbone if args.encoder == "online" else model.momentum_backbone
        # the embedding as train.py's feature pass makes it: the same BN mode, and batches cut
        # from a seeded permutation (evaluate.py's own --feature-batch-size and --seed)
        return backbone, model.feat_dim, (lambda x: model.embed(x, train_args["feature_bn"])), mixture, train_args
    if args.encoder != "online":
        raise UserError("--encoder momentum needs a --checkpoint (an exported backbone is the online one)")
    backbone, feat_dim = load_backbone(args)
    return backbone.to(device), feat_dim, None, None, {}


def load_checkpoint(args):
    """A train.py checkpoint -> (SiamMM in eval mode, VMFMixture or None, training flags).

    The model settings (arch, stem, head widths, D) always come from the checkpoint; the
    data settings come from it unless a flag overrides them (the data may have moved)."""
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file (train.py writes OUT_DIR/checkpoint.pth)")
    ckpt = run_safety.load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not {"model", "model_config", "args"} <= set(ckpt):
        raise UserError(f"{path} is not a train.py checkpoint (no 'model', 'model_config' and 'args'); "
                        "for an exported backbone use --backbone")
    targs, cfg = ckpt["args"], ModelConfig(**ckpt["model_config"])
    args.data = args.data or targs["data"]
    args.data_dir = targs.get("data_dir", "") if args.data_dir is None else args.data_dir
    args.img_size = args.img_size or targs["img_size"]
    if args.arch and args.arch != cfg.arch:
        raise UserError(f"--arch {args.arch} differs from the checkpoint's {cfg.arch}: drop --arch")
    args.arch, args.small_stem, args.width = cfg.arch, cfg.small_stem, cfg.width
    if data.SPECS[args.data].channels != cfg.in_chans:
        raise UserError(f"the checkpoint was trained on {targs['data']} ({cfg.in_chans} channels); "
                        f"--data {args.data} has {data.SPECS[args.data].channels}")
    model = cfg.build()
    # Evaluation uses f, f_m and g_m only (the predictor h serves training alone), so only
    # their tensors must match: a change to the predictor does not lock old checkpoints out.
    used = ("backbone.", "momentum_backbone.", "momentum_projector.")
    sd = {k: v for k, v in ckpt["model"].items() if k.startswith(used)}
    try:
        missing, _ = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:   # shapes differ
        raise UserError(f"{path} does not fit the model its flags describe: "
                        + next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])) from None
    missing = [k for k in missing if k.startswith(used)]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} tensors of the backbone / momentum encoder (e.g. {missing[0]})")
    mixture = None
    if ckpt.get("mixture") is not None:
        mixture = VMFMixture(cfg.dim, ckpt["mixture"]["centroids"].shape[0])
        mixture.load_state_dict(ckpt["mixture"])
    return model.eval(), mixture, targs | {"epoch": ckpt.get("epoch")}


def load_backbone(args):
    """An exported backbone state_dict -> (network without classifier, in eval mode, feature dim).

    A ResNet's stem, width and input channels are read off conv1's weight (3 x 3 = small
    stem; its first dimension = width, its second = channels), so only --arch must be right;
    a wrong one fails to load."""
    path = args.backbone
    if not os.path.isfile(path):
        raise UserError(f"--backbone {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a train.py checkpoint holds more than tensors (flags, RNG states)
        hint = "; a train.py checkpoint? use --checkpoint" if "weights_only" in str(e) else ""
        raise UserError(f"cannot read backbone {path}: {str(e).strip().splitlines()[0]}{hint}") from None
    if not isinstance(sd, dict) or "model" in sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        hint = " (a train.py checkpoint: use --checkpoint)" if isinstance(sd, dict) and "model" in sd else ""
        raise UserError(f"{path} is not a backbone state_dict (tensors by name){hint}")
    args.data = args.data or "fashion-mnist"
    args.data_dir = args.data_dir or ""
    args.img_size = args.img_size or data.SPECS[args.data].img_size
    args.arch = args.arch or "resnet18"
    resnet = "conv1.weight" in sd      # the ResNet options, read off the stem; other networks have none
    args.small_stem = resnet and sd["conv1.weight"].shape[-1] == 3
    args.width, in_chans = sd["conv1.weight"].shape[:2] if resnet else (64, 3)
    if in_chans != data.SPECS[args.data].channels:
        raise UserError(f"the backbone takes {in_chans}-channel images; --data {args.data} has {data.SPECS[args.data].channels}")
    try:
        net, dim = build_backbone(args.arch, args.small_stem, in_chans, args.width)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:   # every key must match (fc is an Identity, so the exported backbone has no fc.*)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        problem = (f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else
                   f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else None)
    except RuntimeError as e:   # shapes differ
        problem = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
    if problem:
        raise UserError(f"the weights in {path} do not fit --arch {args.arch}: {problem}")
    return net.eval(), dim
