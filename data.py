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
import signal
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
def load_image(path, draft=0):
    """An image file as 8-bit RGB. PIL's convert("RGB") clips 16-bit and 32-bit integer
    images at 255, which turns a 16-bit PNG into a near-binary image without a word: those
    are scaled to 8 bits first (16-bit: / 257, so 65535 -> 255).
    draft: a JPEG whose shorter side is at least 2 x draft is decoded at 1/2, 1/4 or 1/8
    scale, shorter side still >= draft (PIL's draft(): the DCT is cut short, nearly free).
    resized_copy uses it: at ImageNet's typical 500 x 375 it rarely applies to a 256 resize."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))   # keeps both sides >= draft
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
    if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir} is a file: give the folder that holds the data")
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


def fingerprint(ds):
    """What identifies a training set wherever it lives (a resume may read it from another
    folder, e.g. a copy on a node's local disk): the number of images, of classes, and a hash
    of the images' paths relative to the split (ImageFolder) or of the first 1,000 images'
    bytes (Fashion-MNIST's idx files). Cheap: no image is decoded."""
    import hashlib
    h = hashlib.sha1()
    if hasattr(ds, "samples"):   # ImageNet: 1.28M paths, about a second
        cut = len(os.path.join(ds.root, ""))
        h.update("\n".join(f"{p[cut:]}\t{y}" for p, y in ds.samples).encode())
    else:
        h.update(np.ascontiguousarray(ds.images[:1000]).tobytes())
    classes = len(getattr(ds, "classes", None) or []) or int(torch.as_tensor(ds.targets).max()) + 1
    return f"{len(ds)} images of {classes} classes, #{h.hexdigest()[:12]}"


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
def check_same_files(ds, copy, img_size, sample=16, seed=0):
    """A resized copy (--feature-data-dir) must list the same images in the same order as
    the data it stands for: the feature pass's row i is training image i. Then, on a seeded
    sample of `sample` images (seconds at any N): each copy is large enough for the
    evaluation view at img_size (its shorter side at least the view's resize, unless the
    original is smaller still: a copy made with too small a --side would blur every
    feature), and shows the same picture: the original resized to the copy's size, as
    data.py makes it, differs by less than 12/255 a pixel on average (JPEG q95: ~2-3/255;
    another image: tens)."""
    rel = [os.path.relpath(p, ds.root) for p, _ in ds.samples]
    rel_copy = [os.path.relpath(p, copy.root) for p, _ in copy.samples]
    where = f"--feature-data-dir {os.path.dirname(copy.root)}"
    if rel != rel_copy:
        diff = next((a, b) for a, b in zip(rel + [None], rel_copy + [None]) if a != b)
        raise UserError(f"{where} does not hold the same images as --data-dir "
                        f"({len(rel_copy)} against {len(rel)}; first difference: {diff[1]} for {diff[0]}): "
                        "make it with python data.py SRC DST")
    need = int(img_size * 256 / 224)   # eval_transform's resize
    picks = torch.randperm(len(rel), generator=torch.Generator().manual_seed(seed))[:sample].tolist()
    for i in sorted(picks):
        orig, small = ds.image(i), copy.image(i)
        side, side_orig = min(small.size), min(orig.size)
        if side < min(need, side_orig):
            raise UserError(f"{where}: {rel_copy[i]} is {small.size[0]} x {small.size[1]}, too small for the "
                            f"{img_size} px view (shorter side at least {need}): make the copy with --side 256 or more")
        ref = T.functional.resize(orig, side) if side < side_orig else orig
        diff = np.abs(np.asarray(ref, np.float32) - np.asarray(small, np.float32)).mean() if ref.size == small.size else 255
        if diff > 12:
            raise UserError(f"{where}: {rel_copy[i]} is not a copy of {rel[i]} in --data-dir (pixels differ by "
                            f"{diff:.0f}/255 on average): make the copy again with python data.py SRC DST")


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


def shapes_view(size, crop_min=0.2, hflip=0.0, rotate=15.0):
    """One view for small grayscale shapes (digits, garments at 16-28 px), symmetric for both
    views. MoCo v3's colour operations were made for ImageNet photographs: on one channel
    saturation, hue and grayscale do nothing, solarising inverts a dark background into a
    white one, and a blur sized for 16 px (data.GaussianBlur) is below a pixel. What varies
    a handwritten digit or a garment's silhouette is its pose, stroke and exposure: a
    random-resized crop, a small rotation and shift (as IIC and NMCE augment MNIST), and
    brightness/contrast. hflip: the flip probability; 0 where a mirror image changes the class
    (digits 2 / 5, letters), 0.5 where it does not (garments)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomAffine(degrees=rotate, translate=(0.1, 0.1)),
        T.RandomApply([T.ColorJitter(0.4, 0.4)], p=0.8),
        T.RandomHorizontalFlip(hflip),
        T.PILToTensor(),
    ])


# --aug: the two views of a training image (train.py)
AUGMENTATIONS = ("moco", "shapes")


def train_transform(size, crop_min=0.08, aug="moco", hflip=0.5, rotate=15.0):
    """The two training views. moco: MoCo v3's asymmetric pair (the paper's, sec. 5.1);
    shapes: shapes_view twice, for small grayscale images."""
    if aug == "shapes":
        return TwoViews(shapes_view(size, crop_min, hflip, rotate), shapes_view(size, crop_min, hflip, rotate))
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


def feature_loader(ds, batch_size, args, term=False):
    """A loader over this rank's feature_batches: every image once over all ranks, in
    batches of `batch_size` cut from the seeded permutation, no sampler padding. train.py's
    feature pass, evaluate.py's extraction and lincls.py's validation all read through it.
    generator: its own, so starting the workers draws no number from torch's global RNG,
    which stays the training augmentations' alone (a resumed run repeats exactly). Not
    persistent: the workers exit after each pass instead of idling through a training epoch,
    each holding its own copy of the file list (ImageNet: 1.28M paths). term: the workers
    ignore SIGTERM too (train.py, whose run_safety.Checkpoints acts on it after the pass; it then ends the
    workers itself with close_iterator)."""
    batches = feature_batches(len(ds), batch_size, args.rank, args.world_size, args.seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=args.workers,
                                       pin_memory=args.device.type == "cuda", generator=torch.Generator(),
                                       worker_init_fn=functools.partial(ignore_stop_signals, term=term))


def close_iterator(it):
    """End a loader iterator's workers now, through their queues: workers that ignore SIGTERM
    must not outlive the pass (at exit multiprocessing would SIGTERM and wait for them)."""
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler's seeded shuffle and cut, able to start part-way through an epoch
    (start, in samples of this rank): a run stopped mid-epoch resumes at its next batch
    (lincls.py; train.py through EpochSampler)."""

    def __init__(self, ds, world_size, rank, seed, drop_last=False):
        super().__init__(ds, world_size, rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


class EpochSampler(ResumableSampler):
    """The training sampler: ResumableSampler with drop_last, each sample handed to the
    dataset as (seed, epoch, index) so that SeededSamples draws its augmentation from those
    alone."""

    def __init__(self, ds, world_size, rank, seed):
        super().__init__(ds, world_size, rank, seed, drop_last=True)

    def __iter__(self):
        return iter([(self.seed, self.epoch, i) for i in super().__iter__()])


def sample_seed(seed, epoch, i):
    """The seed of image i's augmentation in an epoch. torch's CPU generator (mt19937) keeps
    only 32 bits of a seed, so (seed, epoch, i) are mixed into 32 bits by numpy's SeedSequence
    rather than packed into one integer (whose high bits, epoch and seed, would be cut off)."""
    return int(np.random.SeedSequence([seed, epoch, i]).generate_state(1)[0])


def seeded(seed, epoch, i, fn, *args):
    """fn(*args) with torch's RNG seeded for image i in that epoch (sample_seed), the caller's
    RNG state put back after: the one mechanism behind train.py's and lincls.py's views."""
    state = torch.get_rng_state()
    torch.manual_seed(sample_seed(seed, epoch, i))
    try:
        return fn(*args)
    finally:
        torch.set_rng_state(state)


class SeededSamples(torch.utils.data.Dataset):
    """ds[i], its random augmentation drawn from torch's generator seeded by (seed, epoch, i)
    alone (the caller's RNG state is put back after). A sample's two views thus depend on
    nothing but the run's seed, the epoch and the image: not on the loader's workers, their
    number or order, nor on where in the epoch a run was resumed. This is what lets a run
    stopped at any step continue bit-identically (MoCo v3's loader seeds each worker instead,
    which ties the views to the worker layout). Costs a seed per image (~10 us, against
    ~10 ms to decode and augment an ImageNet JPEG)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        seed, epoch, i = key
        return seeded(seed, epoch, i, self.ds.__getitem__, i)


def ignore_stop_signals(worker_id, term=True):
    """A loader worker's worker_init_fn: SIGTERM and SIGUSR1 (a preemption, Slurm's time-limit
    warning) reach every process of a job, the workers too. They are for the training
    process to act on (run_safety.Checkpoints: finish the step, checkpoint); a worker that died of one
    would end that process with "DataLoader worker exited unexpectedly" before it could.
    term=False (evaluate.py's and lincls.py's passes): SIGUSR1 only, so that SIGTERM still
    ends them as multiprocessing expects at exit. train.py's workers ignore both (a SIGTERM
    to every process of a job would otherwise kill them mid-pass and the rank with them,
    before its stop line) and are shut down by train.py itself (shutdown_workers,
    close_iterator)."""
    if term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def shutdown_workers(loader):
    """End a persistent loader's workers now, through their queues (as its iterator's
    finaliser does): workers that ignore SIGTERM would otherwise hang the interpreter's exit,
    where multiprocessing terminates daemon processes with it and joins them."""
    close_iterator(getattr(loader, "_iterator", None))
    loader._iterator = None


def train_loader(ds, batch_size, args):
    """The training loader: batches of this rank's share of an EpochSampler over
    SeededSamples. Persistent workers (a worker pool started once, not once per epoch:
    ImageNet's 10 workers per GPU each start by building a whole batch) with their own
    generator, so the loader draws nothing from torch's global RNG."""
    sampler = EpochSampler(ds, args.world_size, args.rank, args.seed)
    loader = torch.utils.data.DataLoader(SeededSamples(ds), batch_size=batch_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=args.device.type == "cuda",
                                         drop_last=True, persistent_workers=args.workers > 0,
                                         generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
    return sampler, loader


def sample_paths(ds):
    """The file path of every sample (ImageFolder, possibly inside data.subset), or None."""
    if hasattr(ds, "samples"):
        return [p for p, _ in ds.samples]
    if isinstance(ds, IndexedSubset):
        inner = sample_paths(ds.ds)
        return None if inner is None else [inner[int(i)] for i in ds.idx]
    return None


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


# ----------------------------------------------------------------------------- a resized copy (FFCV-style)
def _resize_file(job):
    src, dst, side, quality = job
    try:
        img = load_image(src, draft=side)
    except Exception as e:   # PIL raises several types (a corrupt JPEG, a text file named .png)
        return f"cannot read image {src}: {e}"
    w, h = img.size
    if min(w, h) > side:
        img = T.functional.resize(img, side)   # shorter side to `side`, antialiased like the evaluation view
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    img.save(dst, format="JPEG", quality=quality)
    return None


def check_copy_paths(src, dst, side):
    """resized_copy's inputs, before anything is written: a destination equal to, inside or
    containing the source would write JPEG bytes over the originals or into the source's own
    splits (training on it would then read the copies as more images); SRC must be an image
    folder with train/ and val/."""
    if not os.path.isdir(src):
        what = "is a file" if os.path.exists(src) else "does not exist"
        raise UserError(f"SRC {src} {what}: give a folder with train/ and val/, one sub-folder per class")
    if not os.path.isdir(os.path.join(src, "train")):
        raise UserError(f"SRC {src} has no train/: give a folder with train/ (and val/), one sub-folder per class")
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        where = "is" if a == b else "is inside" if b.startswith(a + os.sep) else "contains"
        raise UserError(f"DST {dst} {where} SRC {src}: the copy would overwrite or mix with the originals; "
                        "give a folder outside SRC")
    if side < 1:
        raise UserError(f"--side {side}: the copy's shorter side must be at least 1 px (the evaluation view's: 256)")


def resized_copy(src, dst, side=256, quality=95, workers=None):
    """A copy of an image folder (train/ and val/, one folder per class) with every image's
    shorter side at most `side`, as JPEG, with the same relative paths (so ImageFolder lists
    it in the same order). Made once, it is what the feature pass reads every epoch
    (train.py --feature-data-dir): its view resizes to 256 and crops 224 anyway, and a 256 px
    JPEG decodes about 2x faster than ImageNet's typical 500 x 375 (bench/bench_loader.py)."""
    import multiprocessing

    from tqdm import tqdm
    check_copy_paths(src, dst, side)
    jobs = []
    for split in ("train", "val"):
        for root, _, files in os.walk(os.path.join(src, split)):
            for name in sorted(files):
                if name.lower().endswith(datasets.folder.IMG_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(root, name), src)
                    jobs.append((os.path.join(src, rel), os.path.join(dst, rel), side, quality))
    if not jobs:
        raise UserError(f"SRC {src} holds no images ({', '.join(datasets.folder.IMG_EXTENSIONS)}) under train/ and val/")
    with multiprocessing.Pool(workers) as pool:
        for problem in tqdm(pool.imap_unordered(_resize_file, jobs, chunksize=64), total=len(jobs), desc="resizing"):
            if problem:   # the first unreadable file stops the copy, named
                pool.terminate()
                raise UserError(problem + "; remove or replace it and run again (files already copied are rewritten)")
    return len(jobs)


def main(argv=None):
    """python data.py SRC DST: the resized copy; every problem ends in one line (utils.guard)."""
    import argparse
    p = argparse.ArgumentParser(prog="data.py", description="A resized copy of an image folder for the feature pass "
                                                            "(train.py --feature-data-dir DST)")
    p.add_argument("src", help="a folder with train/ and val/, one sub-folder per class (e.g. ImageNet)")
    p.add_argument("dst", help="where the copy goes (ImageNet at 256: about 35 GB)")
    p.add_argument("--side", type=int, default=256, help="the shorter side at most (the evaluation view's resize)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the copy")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    a = p.parse_args(argv)
    from utils import guard
    guard("data.py", lambda a: print(f"{resized_copy(a.src, a.dst, a.side, a.quality, a.workers)} images written to "
                                      f"{a.dst}"), a)


if __name__ == "__main__":
    main()
