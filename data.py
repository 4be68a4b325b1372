"""
Data for train.py, evaluate.py and lincls.py: one place, so that every program reads a data
set the same way. What differs between data sets (channels, normalisation, sizes, where the
files live) is in SPECS and load_dataset, nowhere else.

- fashion-mnist (the embedded default): the idx files of the Debian package
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or of --data-dir, or
  torchvision's download when --download is given and the machine is online.
- folder / imagenet: a torchvision ImageFolder with train/ and val/ (one sub-folder per class).

Labels are read only for evaluation; training never looks at them. Every dataset returns
(image, label, index): the index lets the per-epoch feature pass write each feature to its
sample exactly once and lets the training step look up each sample's cluster assignment.
The loaders send uint8 images; to_input() scales and normalises them on the device.
MoCo v3's augmentations (two asymmetric views) are built here too.
"""

import functools
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torchvision import datasets

from utils import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Spec:
    """What a data set needs from the code."""
    channels: int          # input channels of the first conv (1: grayscale, no copy x 3)
    mean: tuple            # per-channel normalisation
    std: tuple
    centre_crop: bool      # evaluation view: resize to 256/224 of the size and centre-crop (ImageNet), or resize
    img_size: int          # default evaluation size of an exported backbone (a checkpoint carries its own)
    raw_size: int          # side of the raw-pixel baseline (evaluate.py --raw-size overrides it)
    thumb: int             # side of an image in the report's grids


SPECS = {
    # 28 x 28 grayscale; mean / std of the train split
    "fashion-mnist": Spec(1, (0.2860,), (0.3530,), False, 16, 28, 28),
    "folder": Spec(3, IMAGENET_MEAN, IMAGENET_STD, True, 224, 32, 64),
    "imagenet": Spec(3, IMAGENET_MEAN, IMAGENET_STD, True, 224, 32, 64),
}
NAMES = list(SPECS)


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path):
    """An idx file (Fashion-MNIST's format: a magic number, the shape, then uint8 values)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError) as e:   # empty, truncated or not an idx file
        raise UserError(f"cannot read {path} ({e}): it is empty or truncated; reinstall "
                        "dataset-fashion-mnist or download it again") from None


def _find_idx(root, stem):
    for name in (stem, stem + ".gz"):
        for sub in ("", "raw", "FashionMNIST/raw"):
            p = os.path.join(root, sub, name)
            if os.path.exists(p):
                return p
    return None


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from its idx files (28 x 28 grayscale, 10 classes, 60k train / 10k test)."""

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root, train=True, transform=None, download=False):
        split = "train" if train else "t10k"
        root = root or DEBIAN_FASHION_MNIST
        img_path = _find_idx(root, f"{split}-images-idx3-ubyte")
        lbl_path = _find_idx(root, f"{split}-labels-idx1-ubyte")
        if not (img_path and lbl_path) and download:
            # online users: torchvision fetches the same idx files into root
            target = root if root != DEBIAN_FASHION_MNIST else "./data"
            datasets.FashionMNIST(target, train=train, download=True)
            img_path = _find_idx(target, f"{split}-images-idx3-ubyte")
            lbl_path = _find_idx(target, f"{split}-labels-idx1-ubyte")
        if not (img_path and lbl_path):
            if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
                raise UserError(f"{root} holds train/ and val/ folders, not Fashion-MNIST's idx files: "
                                "add --data folder to read it as an image folder")
            raise UserError(f"no Fashion-MNIST {split} idx files in {root}: run `apt-get install "
                            "dataset-fashion-mnist`, pass --data-dir, or add --download when online")
        self.images = _read_idx(img_path)
        self.targets = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def image(self, i):
        return Image.fromarray(self.images[i], mode="L")

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), int(self.targets[i]), i


# ----------------------------------------------------------------------------- image folders
def load_image(path):
    """An image file as 8-bit RGB. PIL's convert("RGB") clips 16-bit and 32-bit integer
    images at 255, which turns a 16-bit PNG into a near-binary image without a word: those
    are scaled to 8 bits first (16-bit: / 257, so 65535 -> 255)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode.startswith("I"):        # I;16, I;16B, I;16L, I (32-bit int, how PIL may open a 16-bit PNG)
        a = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":               # 32-bit float: taken to be in [0, 1]
        img = Image.fromarray(np.clip(np.round(np.asarray(img) * 255), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


class ImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder that also returns the index and names an unreadable file."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=load_image)

    def image(self, i):
        path = self.samples[i][0]
        try:
            return self.loader(path)
        except Exception as e:  # PIL raises several types; the user needs the file name
            raise UserError(f"cannot read image {path}: {e}") from None

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), self.targets[i], i


def load_dataset(name, data_dir, split, transform=None, download=False):
    """The dataset `name` (a key of SPECS), split 'train' or 'val'."""
    if name not in SPECS:
        raise UserError(f"unknown --data {name!r}: {', '.join(NAMES)}")
    if data_dir and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir} does not exist")
    if name == "fashion-mnist":
        return FashionMNIST(data_dir, train=(split == "train"), transform=transform, download=download)
    if not data_dir:
        raise UserError(f"--data {name} needs --data-dir pointing at a folder with train/ and val/")
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist: --data-dir must hold train/ and val/ sub-folders, one folder per class")
    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
        raise UserError(f"{root} holds no images in class sub-folders ({e})") from None


def check_same_classes(train_set, val_set):
    """The val split must name its classes as train does: ImageFolder numbers the classes of
    each folder by sorted name, so a class missing from one split would shift every label
    after it and score one class as another without a word."""
    a, b = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if a is not None and b is not None and list(a) != list(b):
        only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise UserError(f"train/ and val/ have different class folders (only in train/: {only_train[:3]}, "
                        f"only in val/: {only_val[:3]}): give both splits the same class sub-folders")


# ----------------------------------------------------------------------------- transforms
class Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img)


class GaussianBlur:
    """MoCo v3 / SimCLR blur: sigma drawn from [0.1, 2.0] px at 224 px (PIL, on the image
    before ToTensor), scaled by size / 224 for other sizes: SimCLR sizes its kernel as 10% of
    the image, so the blur must shrink with the image. Unscaled, a 2 px blur on a 16 px
    Fashion-MNIST view (on every view 1, p = 1.0) wipes out the texture that tells a shirt
    from a pullover; scaled, small views are barely blurred, as in SimSiam's CIFAR recipe,
    which drops blur altogether."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, img):
        # torch's RNG, so a resumed run (which restores it) draws the same radii
        sigma = float(torch.empty(()).uniform_(0.1, 2.0)) * self.scale
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


@functools.lru_cache(maxsize=None)
def _mean_std(name, device):
    """The data set's per-channel mean and std as C x 1 x 1 tensors on `device`, made once:
    a tensor built from a Python list on a GPU is a blocking copy, which would stall the
    host on every step."""
    spec = SPECS[name]
    return (torch.tensor(spec.mean, device=device)[:, None, None], torch.tensor(spec.std, device=device)[:, None, None])


def to_input(x, name, device):
    """A batch of uint8 images from the loader -> the network's float input on `device`:
    scaled to [0, 1] and normalised there (ToTensor + Normalize, the same arithmetic in the
    same order, so the numbers are bit-identical), channels_last on a GPU.

    The loader's workers send uint8, a quarter of float32: at ImageNet scale a batch of 512
    images x 2 views x 3 x 224 x 224 is 154 MB instead of 616 MB, and with 10 workers
    prefetching 2 batches each that is 3 GB of shared memory per process instead of 12."""
    mean, std = _mean_std(name, device)
    x = x.to(device, non_blocking=True).to(torch.get_default_dtype()).div(255)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def moco_v3_view(size, blur_p, solarize_p, crop_min=0.08):
    """One view of MoCo v3's asymmetric augmentation (view 1: blur 1.0, solarise 0.0;
    view 2: blur 0.1, solarise 0.2), sized for the data: the crop and the blur's sigma follow
    `size`. Colour jitter acts as brightness/contrast on grayscale."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur(size / 224)], p=blur_p),
        T.RandomApply([Solarize()], p=solarize_p),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),   # uint8; to_input() scales and normalises on the device
    ])


class TwoViews:
    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def train_transform(size, crop_min=0.08):
    return TwoViews(moco_v3_view(size, 1.0, 0.0, crop_min), moco_v3_view(size, 0.1, 0.2, crop_min))


def eval_transform(name, size):
    """Deterministic: the feature pass of every epoch and all evaluation use it. ImageNet:
    resize to 256/224 of the size, centre crop; small images: resize to the training size.
    uint8 out, like the training views (to_input() normalises on the device)."""
    if not SPECS[name].centre_crop:
        return T.Compose([T.Resize(size), T.PILToTensor()])
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])


# ----------------------------------------------------------------------------- batches and subsets
def feature_batches(n, batch_size, rank=0, world_size=1, seed=0):
    """Batches of sample positions 0..n-1 for a feature pass, this rank's share.

    The batches are cut from one fixed, seeded permutation of 0..n-1, not from consecutive
    positions: an image folder (ImageNet) lists its images sorted by class, so consecutive
    batches hold one class each, and batch-statistics BN (SiamMM.embed) would then subtract
    each class's own mean, the very signal the mixture has to find. A random cut gives every
    batch the data set's class mix, as a training batch has.
    The permutation and the cut do not depend on the world size and the batches are dealt
    out whole (rank r gets batches r, r + W, ...), so every image gets the same embedding on
    1 or 8 GPUs, each image is embedded exactly once, and nothing is padded. A last batch of
    1 image is folded into the one before: BN needs 2."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cuts = list(range(0, n, batch_size)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < 2:
        del cuts[-2]
    return [order[a:b] for a, b in list(zip(cuts[:-1], cuts[1:]))[rank::world_size]]


def feature_loader(ds, batch_size, args):
    """A loader over this rank's feature_batches: every image once over all ranks, in
    batches of `batch_size` cut from the seeded permutation, no sampler padding. train.py's
    feature pass, evaluate.py's extraction and lincls.py's validation all read through it.
    generator: its own, so starting the workers draws no number from torch's global RNG,
    which stays the training augmentations' alone (a resumed run repeats exactly). Not
    persistent: the workers exit after each pass instead of idling through a training epoch,
    each holding its own copy of the file list (ImageNet: 1.28M paths)."""
    batches = feature_batches(len(ds), batch_size, args.rank, args.world_size, args.seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=args.workers,
                                       pin_memory=args.device.type == "cuda", generator=torch.Generator())


def subset(ds, n, seed=0):
    """The first n samples of a seeded permutation (no labels used), or ds itself."""
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return IndexedSubset(ds, idx)


class IndexedSubset(torch.utils.data.Dataset):
    """A subset whose returned index is the position in the subset (0..n-1), so per-sample
    tables stay dense; `targets` follows the subset."""

    def __init__(self, ds, idx):
        self.ds, self.idx = ds, idx
        self.targets = torch.as_tensor(ds.targets)[idx]
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.idx)

    def image(self, i):
        return self.ds.image(int(self.idx[i]))

    def __getitem__(self, i):
        x, y, _ = self.ds[int(self.idx[i])]
        return x, y, i
