"""
Helpers that train.py, evaluate.py and linear.py share (DINO keeps the same kind in its
utils.py): errors for people, processes under torchrun, mixed precision, atomic
checkpoints and RNG states. Nothing here is specific to SiamMM.
"""

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors for people
class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


def fail(prog, msg):
    """One clear line for a person, no traceback, exit status 2 (as argparse does). An
    error raised in a DataLoader worker arrives wrapped in the worker's traceback: its last
    line is the message itself."""
    lines = str(msg).strip().splitlines() or ["unknown error"]
    msg = lines[-1]
    for prefix in ("utils.UserError: ", "UserError: "):
        msg = msg.removeprefix(prefix)
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that states a bad flag in one line: its usage block buries the message."""

    def error(self, message):
        fail(self.prog, f"{message} (see --help)")


def check_flags(parser, args, positive=(), non_negative=(), fractions=()):
    """Flags with a valid range, checked before any work starts: `positive` must be > 0,
    `non_negative` >= 0, `fractions` in (0, 1]. NaN fails every check. Each failure is the
    argparse-style line naming the flag."""
    def name(k):
        return "--" + k.replace("_", "-")
    for k in positive:
        v = getattr(args, k)
        if v is not None and not v > 0:
            parser.error(f"{name(k)} {v}: must be positive")
    for k in non_negative:
        v = getattr(args, k)
        if v is not None and not v >= 0:
            parser.error(f"{name(k)} {v}: must be 0 or more")
    for k in fractions:
        v = getattr(args, k)
        if v is not None and not 0 < v <= 1:
            parser.error(f"{name(k)} {v}: must lie in (0, 1]")


# ----------------------------------------------------------------------------- processes
def setup_distributed(args, timeout_min=30.0):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `python x.py` is one process. Sets
    args.distributed, rank, world_size, local_rank, master and dev (this process's device)
    from args.device ("auto", "cpu", "cuda", "cuda:N").

    timeout_min bounds every collective: a rank that stops (frozen, or its node lost)
    would otherwise leave the others waiting in an all-reduce, and torchrun does not notice
    a stopped process. The others then fail after the timeout instead of hanging."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not (args.device.startswith("cuda:") and args.device[5:].isdigit()):
        raise UserError(f"--device {args.device}: auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}, but torch sees no GPU: use --device cpu")
    args.distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    if args.distributed:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.master = args.rank == 0
    if args.device.startswith("cuda"):
        index = int(args.device[5:]) if args.device.startswith("cuda:") else args.local_rank
        args.dev = torch.device("cuda", index)
        torch.cuda.set_device(args.dev)
    else:
        args.dev = torch.device("cpu")
    if args.distributed:
        dist.init_process_group("nccl" if args.dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return args


def is_dist_timeout(e):
    """A collective that waited past the timeout (a stopped or lost rank)."""
    return isinstance(e, (RuntimeError, dist.DistError)) and ("timed out" in str(e).lower() or "timeout" in str(e).lower())


def autocast(device, amp="bf16"):
    """Mixed precision on CUDA (bf16 by default, fp16 with a GradScaler); exact fp32 on a CPU."""
    if device.type != "cuda" or amp == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash or a full disk mid-write never
    destroys the last good file (os.replace is atomic on POSIX). A failed write removes its
    partial temporary file and says why in one line."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        folder = os.path.dirname(os.path.abspath(path))
        full = getattr(e, "errno", None) == errno.ENOSPC or _free_bytes(folder) < 2 ** 20
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = (f"no space left on the device of {folder}" if full else
               (e.strerror or str(e)) if isinstance(e, OSError) else str(e).strip().splitlines()[0])
        raise UserError(f"cannot write {path}: {why}; "
                        + ("the last good checkpoint is kept" if os.path.exists(path) else "nothing was saved")) from None


def _free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def load_checkpoint_file(path, what="checkpoint"):
    """torch.load that turns an empty, truncated or foreign file into one clear line.
    weights_only=False: the checkpoints hold RNG states (numpy arrays) and flags."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # EOFError, RuntimeError (zip), UnpicklingError, ...: the file is damaged
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'empty'}): "
                        "it is empty, truncated or not a torch file; restore it or start a new --out-dir") from None


def trim_log(path, epoch):
    """Keep the JSON lines of epochs up to `epoch` (and drop a torn last line), atomically:
    after a crash between the log line of an epoch and its checkpoint, the resumed run
    repeats that epoch and must not log it twice."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["epoch"] <= epoch:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)



def rng_state(dev):
    """This process's RNG states. On a GPU only its own device's: a job resumed on a node that
    shows fewer GPUs (CUDA_VISIBLE_DEVICES, another node type) must still restore it."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def set_rng_state(s, dev):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], dev)


def gather_rng(args):
    """Every rank's RNG state (rank 0 saves them all), so a resumed run draws the same
    augmentations on every rank as the uninterrupted one would have."""
    state = rng_state(args.dev)
    if not args.distributed:
        return [state]
    out = [None] * args.world_size
    dist.all_gather_object(out, state)
    return out


def state_digest(module):
    """SHA-256 of every tensor of the state_dict, buffers included (BN running statistics):
    MoCo v3's main_lincls sanity_check, which asserts that the frozen backbone is
    bit-identical to the pre-trained one. Returns {key: digest}."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def changed_keys(module, digest):
    now = state_digest(module)
    return [k for k in digest if now.get(k) != digest[k]]
