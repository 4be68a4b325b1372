"""
Helpers that train.py, evaluate.py and lincls.py share (DINO keeps the same kind in its
utils.py): errors for people, processes under torchrun, mixed precision and RNG states
(what keeps a run alive, its checkpoints included, is run_safety.py). Nothing here is
specific to SiamMM.
"""

import argparse
import datetime
import hashlib
import inspect
import math
import os
import random
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
    line is the message itself; any other message's first line is its gist."""
    lines = [ln for ln in str(msg).strip().splitlines() if ln.strip()] or ["unknown error"]
    msg = lines[-1] if "Traceback (most recent call last)" in str(msg) else lines[0]
    for prefix in ("utils.UserError: ", "UserError: "):
        msg = msg.removeprefix(prefix)
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def guard(prog, run, args):
    """run(args), with every failure a person can cause ended in one line: a UserError, a
    file or folder the run cannot read or write (OSError: permissions, a full disk), and a
    collective that waited past --dist-timeout (a stopped or lost process)."""
    try:
        return run(args)
    except (UserError, ValueError) as e:   # ValueError: a bad setting caught by the model, loss or mixture
        fail(prog, e)
    except OSError as e:
        fail(prog, f"{e.filename or 'a file'}: {e.strerror or e}")
    except Exception as e:
        if is_peer_lost(e):
            fail(prog, f"rank {getattr(args, 'rank', 0)} lost its connection to another process, which stopped or was "
                       "killed (torchrun's error summary names it): see its log, then "
                       + (rerun_hint(args) if hasattr(args, "resume") else "rerun the same command"))
        if is_dist_timeout(e):
            # The waiting rank cannot tell which peer stopped (NCCL and gloo only time out);
            # torchrun's error summary names the rank whose process ended first.
            fail(prog, f"rank {getattr(args, 'rank', 0)} waited {args.dist_timeout:g} min for another process, "
                       "which stopped or was lost (torchrun's error summary names it): see its log, then "
                       + (rerun_hint(args) if hasattr(args, "resume") else "rerun the same command"))
        raise
    finally:
        if getattr(args, "lock", None):   # OUT_DIR's lock (take_lock): the process may go on (main() from Python)
            args.lock.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that states a bad flag in one line: its usage block buries the message."""

    def error(self, message):
        fail(self.prog, f"{message} (see --help)")


def flag(dest):
    """An argparse destination as its flag: num_clusters -> --num-clusters."""
    return f"--{dest.replace('_', '-')}"


def check_keywords(parser, families):
    """Flags that reach functions by name (fn(**vars(args))): families = {selector flag:
    (registry {name: function}, the arguments the caller passes itself, the family's flags)}.
    A function that takes a keyword other than those (a renamed or new flag that was not
    added, or a name that belongs to another flag, e.g. eq. 10's --tau in a loss), or a family
    flag that none of its functions reads, stops the program with one line naming both."""
    for selector, (registry, passed, flags) in families.items():
        read = set()
        for name, fn in registry.items():
            takes = {k for k, v in inspect.signature(fn).parameters.items()
                     if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)} - set(passed)
            read |= takes
            for k in sorted(takes - set(flags)):
                parser.error(f"{fn.__module__}.{fn.__name__} ({flag(selector)} {name}) takes '{k}', which is not one "
                             f"of its flags ({', '.join(flag(f) for f in flags)}): rename it to its flag, or add the "
                             f"flag to {parser.prog}'s list for {flag(selector)}")
        for k in sorted(set(flags) - read):
            parser.error(f"{flag(k)} is a flag of {flag(selector)}, but no function of it ({', '.join(registry)}) "
                         f"takes '{k}': rename the keyword, or remove the flag")


def check_flags(parser, args, positive=(), non_negative=(), fractions=()):
    """Flags with a valid range, checked before any work starts: `positive` must be > 0,
    `non_negative` >= 0, `fractions` in (0, 1]. NaN fails every check. Each failure is the
    argparse-style line naming the flag."""
    for k in positive:
        v = getattr(args, k)
        if v is not None and not v > 0:
            parser.error(f"{flag(k)} {v}: must be positive")
    for k in non_negative:
        v = getattr(args, k)
        if v is not None and not v >= 0:
            parser.error(f"{flag(k)} {v}: must be 0 or more")
    for k in fractions:
        v = getattr(args, k)
        if v is not None and not 0 < v <= 1:
            parser.error(f"{flag(k)} {v}: must lie in (0, 1]")


# ----------------------------------------------------------------------------- cost, before a stage runs
def seconds(flops, device):
    """A conservative estimate of the time of `flops` on `device`: 20 TFLOP/s on a GPU,
    20 GFLOP/s per CPU thread."""
    return flops / (2e13 if device.type == "cuda" else 2e10 * torch.get_num_threads())


def check_cost(what, flops, flag, device, max_hours=1.0):
    """Stop now, with one line naming `flag`, when a stage would take more than max_hours on
    `device` (seconds())."""
    hours = seconds(flops, device) / 3600
    if hours > max_hours:
        raise UserError(f"{what} would take about {hours:.0f} h on {device} ({flops / 1e12:.0f} TFLOP): {flag}")


def check_memory(nbytes, what, flag):
    """Stop now when `nbytes` would not fit in this machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > 0.8 * total:
        raise UserError(f"{what} needs about {nbytes / 2 ** 30:.1f} GiB, this machine has {total / 2 ** 30:.1f} GiB: {flag}")


# ----------------------------------------------------------------------------- processes
def setup_distributed(args, timeout_min=30.0):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `python x.py` is one process. Sets
    args.distributed, rank, world_size, local_rank and master, and turns args.device (the
    flag: "auto", "cpu", "cuda", "cuda:N") into this process's torch.device.

    timeout_min bounds every collective: a rank that stops (frozen, or its node lost)
    would otherwise leave the others waiting in an all-reduce, and torchrun does not notice
    a stopped process. The others then fail after the timeout instead of hanging."""
    name = str(args.device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name}: auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but torch sees no GPU: use --device cpu")
    args.distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if args.distributed and name.startswith("cuda:"):
        raise UserError(f"--device {name} under torchrun would put every process on one GPU: "
                        "use --device cuda (each process takes cuda:LOCAL_RANK)")
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    if args.distributed:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.master = args.rank == 0
    if name.startswith("cuda"):
        args.device = torch.device("cuda", int(name[5:]) if name.startswith("cuda:") else args.local_rank)
        torch.cuda.set_device(args.device)
    else:
        args.device = torch.device("cpu")
    if args.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return args


def distribute(model, args, sync_bn=True):
    """The model on this process's device (channels_last on a GPU), and under torchrun
    wrapped in DistributedDataParallel, its BatchNorms synchronised over all GPUs when
    sync_bn (MoCo v3; CPU runs use gloo, where SyncBatchNorm does not run). Returns (the
    model to call in training, the model itself)."""
    if args.distributed and args.device.type == "cuda" and sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(args.device)
    if args.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if not args.distributed:
        return model, model
    ids = [args.device.index] if args.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), model


def is_peer_lost(e):
    """A collective whose peer went away (killed, crashed): gloo's "Connection reset/closed by
    peer", a broken pipe, NCCL's remote error."""
    text = str(e)
    return isinstance(e, (RuntimeError, dist.DistError)) and any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited"))


def is_dist_timeout(e):
    """A collective that waited past the timeout (a stopped or lost rank)."""
    return isinstance(e, (RuntimeError, dist.DistError)) and ("timed out" in str(e).lower() or "timeout" in str(e).lower())


def fast_cuda(device):
    """The CUDA settings of training (and of every bench that times it): cuDNN picks the fastest
    convolution algorithm for the fixed input shape (benchmark), and fp32 matrix products and
    convolutions run on TF32 tensor cores (MoCo v3's and DINO's choice; autocast handles bf16)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device, amp="bf16"):
    """Mixed precision on CUDA (bf16 by default, fp16 with a GradScaler); exact fp32 on a CPU."""
    if device.type != "cuda" or amp == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def default_workers(cap=10):
    """Loader processes per training/evaluation process: the cores this process may use over
    the processes of this node (torchrun's LOCAL_WORLD_SIZE), at most `cap` (MoCo v3 uses
    10 per GPU on 80-core nodes), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(cap, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def distributed():
    """True under torch.distributed with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_device():
    """Where the process group sums tensors: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t):
    """t summed over all ranks, on t's own device (t itself on one process). The M-step's
    sums (cluster.py) are all this: r_k, n_k, the PCA moments, the objective."""
    if not distributed():
        return t
    x = t.to(reduce_device())
    dist.all_reduce(x)
    return x.to(t.device)


def gather_rows(local, index, n_total, dst=None):
    """The n_total-row table whose row index[i] is local[i], from whichever rank holds it:
    on every rank (dst=None), or on rank dst alone (the others get None). Every rank passes
    a tensor of the same row shape and type, with 0 rows where it holds none.

    Each row has exactly one owner, so the table is the sum over ranks of tables that are
    zero except for their own rows: an all-reduce (or a reduce to dst), in pieces of at most
    2^24 values, so that a rank holds its shard, the table where it keeps one, and one piece.
    Uses: the E-step's assignment tables on every rank (any rank looks up any sample of its
    batch), InfoNCE's keys of every rank (MoCo v3's concat_all_gather), evaluate.py's
    features on rank 0."""
    index = torch.as_tensor(index).long().cpu()
    row_shape = tuple(local.shape[1:])
    if not distributed():
        table = torch.zeros((n_total,) + row_shape, dtype=local.dtype, device=local.device)
        table[index.to(local.device)] = local
        return table
    dev = reduce_device()
    keep = dst is None or dist.get_rank() == dst
    table = torch.empty((n_total,) + row_shape, dtype=local.dtype, device=local.device) if keep else None
    step = max(1, 2 ** 24 // max(1, math.prod(row_shape)))
    for s in range(0, n_total, step):
        e = min(s + step, n_total)
        piece = torch.zeros((e - s,) + row_shape, dtype=local.dtype, device=dev)
        mine = (index >= s) & (index < e)
        piece[(index[mine] - s).to(dev)] = local[mine.to(local.device)].to(dev)
        if dst is None:
            dist.all_reduce(piece)
        else:
            dist.reduce(piece, dst)
        if keep:
            table[s:e] = piece.to(local.device)
    return table


# ----------------------------------------------------------------------------- schedules
def cosine_schedule(t, total, base, final=0.0, warmup=0.0):
    """Linear warm-up from 0 to `base` over the first `warmup` of `total`, then half a cosine
    from `base` to `final` at t = total (DINO's cosine_scheduler, as a function of t; t,
    warmup and total in one unit: epochs, fractional epochs or steps). The learning rates of
    train.py (sec. 5.1), lincls.py (main_lincls, per epoch) and the quick probe follow it,
    and the EMA momentum (MoCo v3, BYOL: from m0 to 1)."""
    if t < warmup:
        return base * t / warmup
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def rerun_hint(args):
    """What continues a stopped run, true for each --resume mode: with --resume none the same
    command would start afresh again."""
    if args.resume == "none":
        return "rerun it without --resume none to continue (with it, the run starts afresh)"
    return "rerun the same command to continue"


def seed_all(seed):
    """Seed every generator the training draws from: torch's, numpy's and Python's."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
    state = rng_state(args.device)
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
