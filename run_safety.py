"""
What keeps a run alive, shared by train.py and lincls.py, so that they can read as their
papers: none of this is SiamMM. DINO keeps its requeueing in a file of its own as well.

  flags         --out-dir, --resume, --checkpoint-minutes, --stop-after-epoch, --seed,
                --device, --dist-timeout: the same in both programs (add_run_flags)
  OUT_DIR       a lock (one job per folder), the log cut back to the checkpoint on resume,
                --resume auto / none / PATH (open_run)
  checkpoints   written atomically (atomic_save), read with one line for a damaged file,
                resumed with the flags checked (check_resumed_flags, restore)
  signals       SIGTERM / SIGUSR1 and --checkpoint-minutes: finish the step, save a
                mid-epoch checkpoint (MidEpoch), exit; the rerun continues bit-identically
                (Checkpoints)
  divergence    the epoch's loss sums and a stop, in one line, when the loss is not finite
                (LossSums, check_divergence)
"""

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import utils
from utils import UserError


# ----------------------------------------------------------------------------- OUT_DIR
def add_run_flags(p, out_dir_default):
    """The flags of where a run lives and how it survives, the same in train.py and lincls.py."""
    p.add_argument("--out-dir", help=f"where the run lives: its checkpoints and log.jsonl (default {out_dir_default})")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from OUT_DIR/checkpoint.pth if there (DINO's behaviour: rerunning a command, "
                        "or a requeued job, never starts a run over); none: start afresh, moving an earlier run's "
                        "checkpoints and log to OUT_DIR/replaced/; or a checkpoint path to start from (once OUT_DIR has "
                        "its own checkpoint, a rerun continues that)")
    p.add_argument("--checkpoint-minutes", type=float, default=30.0,
                   help="also save a mid-epoch checkpoint when this long has passed since the last one (a hard kill "
                        "then loses at most this much; 0 = at epoch ends only); SIGTERM and SIGUSR1 save one and stop")
    p.add_argument("--stop-after-epoch", type=int, default=0,
                   help="exit after this epoch, to resume later (a scheduler that sends no signal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dist-timeout", type=float, default=30.0,
                   help="minutes a process waits for the others in a collective before the run stops "
                        "(a frozen or lost rank would otherwise hang the rest)")


def take_lock(args):
    """An exclusive lock on OUT_DIR/.lock for the life of the job (flock: the kernel drops
    it when the process ends, kill -9 included; utils.guard closes it when the run returns)."""
    import fcntl
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        args.lock = open(os.path.join(args.out_dir, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {args.out_dir}: {e.strerror}") from None
    try:
        fcntl.flock(args.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        args.lock.seek(0)
        owner = args.lock.read().strip() or "another process"
        raise UserError(f"another job is training in --out-dir {args.out_dir} ({owner}): wait for it to end, "
                        "stop it, or use another --out-dir") from None
    args.lock.truncate(0)
    args.lock.write(f"pid {os.getpid()} on {os.uname().nodename}")
    args.lock.flush()


def run_files(out_dir):
    """A run's own files in OUT_DIR: its checkpoints and log (not args.json, rewritten by every run)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(n for n in names if n == "log.jsonl" or (n.startswith("checkpoint") and n.endswith(".pth")))


def move_aside(out_dir):
    """--resume none over an earlier run: its checkpoints and log move to OUT_DIR/replaced/
    (an older replaced/ is removed first), so the folder never holds half of each run, and a
    plain rerun cannot 'resume' the old run. Says what it moved, in one line."""
    import shutil
    names = run_files(out_dir)
    if not names:
        return
    aside = os.path.join(out_dir, "replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.makedirs(aside)
    for n in names:
        os.replace(os.path.join(out_dir, n), os.path.join(aside, n))
    print(f"note: --resume none starts afresh: the earlier run's {', '.join(names)} moved to {aside}", flush=True)


def open_run(args, program, keys):
    """Before anything is written: rank 0 takes OUT_DIR's lock (a second job in the same
    folder, e.g. the ranks of a killed torchrun agent still running, would interleave
    checkpoints and logs), and every rank reads the checkpoint it sees, which must be
    `program`'s (hold `keys`):
      --resume auto   OUT_DIR/checkpoint.pth if there, else a fresh run (rerun = resume)
      --resume PATH   PATH for the first start; once this run has saved OUT_DIR/checkpoint.pth
                      a rerun (a requeued job) continues that, not PATH again
      --resume none   a fresh run; an earlier run's files move to OUT_DIR/replaced/
    All ranks then agree on one epoch to resume from: nodes without a shared --out-dir would
    otherwise resume on some ranks and start afresh on others, and the replicas would drift
    apart without a word. Returns the checkpoint (or None) and its path."""
    if not args.resume:
        raise UserError("--resume is empty (an unset variable?): give auto (the default: continue OUT_DIR's run), "
                        "none (start afresh) or a checkpoint's path")
    own = os.path.join(args.out_dir, "checkpoint.pth")
    path = {"auto": own, "none": None}.get(args.resume, args.resume)
    if path not in (own, None) and os.path.exists(own) and not (os.path.exists(path) and os.path.samefile(path, own)):
        if args.master:
            print(f"note: {own} holds this run's own progress: continuing it rather than --resume {path} "
                  "(which starts a run only in a folder without a checkpoint)", flush=True)
        path = own
    problem, ckpt = None, None
    try:
        if args.master:
            take_lock(args)
            if args.resume == "none":
                move_aside(args.out_dir)
        if path and (path != own or os.path.exists(path)):   # a named file must exist
            ckpt = load_checkpoint_file(path)
            if not isinstance(ckpt, dict) or not set(keys) <= set(ckpt):
                raise UserError(f"{path} is not a {program} checkpoint; start a new --out-dir")
    except UserError as e:
        problem = str(e)
    seen = [(problem, ckpt["epoch"] if ckpt else None)]
    if args.distributed:
        seen = [None] * args.world_size
        dist.all_gather_object(seen, (problem, ckpt["epoch"] if ckpt else None))
    for rank, (problem, _) in enumerate(seen):
        if problem:
            raise UserError(problem if rank == args.rank or not args.distributed else f"rank {rank}: {problem}")
    if len({e for _, e in seen}) > 1:
        where = ", ".join(f"rank {r}: {'epoch ' + str(e) if e is not None else 'none'}" for r, (_, e) in enumerate(seen))
        raise UserError(f"the ranks see different checkpoints at {path or 'OUT_DIR/checkpoint.pth'} ({where}): put "
                        "--out-dir on a file system that every node shares, or copy the checkpoint to every node")
    return ckpt, path


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


def log_line(args, record):
    """One JSON line in OUT_DIR/log.jsonl (rank 0; an OSError ends in one line: utils.guard)."""
    if args.master:
        with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, *paths):
    """Write to a temporary file, then rename: a crash or a full disk mid-write never
    destroys the last good file (os.replace is atomic on POSIX). The object is serialised
    in memory once (for every path: --save-every's extra copy costs a write, not a second
    serialisation) and written with one write and an fsync, so a failed write is the
    operating system's own error (no space left, read-only, ...), said in one line, and the
    partial temporary file is removed. The in-memory copy is the checkpoint's size for a
    moment (ImageNet's: about 0.8 GB, on rank 0 only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    for path in paths:
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            kept = "the last good checkpoint is kept" if os.path.exists(path) else "nothing was saved"
            raise UserError(f"cannot write {path}: {e.strerror or e} ({len(buf.getbuffer()) / 2 ** 20:.1f} MiB); "
                            f"{kept}") from None


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


def saved_args(args):
    """The flags as written to args.json and the checkpoints: no process-group or lock handle,
    the device as its name."""
    return {k: v for k, v in vars(args).items() if k not in ("local_group", "lock")} | {"device": str(args.device)}


def check_resumed_flags(ckpt, args, path, fixed, noted=None, quiet=()):
    """A resume under other flags, as MoCo v3 does it: the command line wins (a new lambda, a
    longer --epochs) and the run says which flags differ: those in `noted`, or (None) every
    saved flag but those in `quiet` (where and how the process runs, not what it trains).
    Flags in `fixed` ({name: what it decides}) would make it another run: refused in one line."""
    saved = ckpt.get("args", {})
    for k, what in fixed.items():
        if k in saved and saved[k] != getattr(args, k):
            raise UserError(f"cannot resume {path} with {utils.flag(k)} {getattr(args, k)}: the run has {utils.flag(k)} {saved[k]} "
                            f"({what}); use the same value or another --out-dir")
    names = noted if noted is not None else [k for k in sorted(saved) if k not in quiet]
    changed = [f"{utils.flag(k)} {getattr(args, k)} (was {saved[k]})" for k in names
               if k in saved and k in vars(args) and saved[k] != getattr(args, k)]
    if changed and args.master:
        print(f"note: from epoch {ckpt['epoch'] + 1} on, this run differs from the checkpoint's flags: " + ", ".join(changed))


def restore(ckpt, path, model, optimizer, scaler, args):
    """Load the weights, optimiser and AMP scaler of a checkpoint, cut the log back to its
    epoch and say where the run resumes. Returns its MidEpoch (or None)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:   # a checkpoint of another code version or model
        raise UserError(f"cannot resume {path}: its weights do not fit this model "
                        f"({str(e).splitlines()[0]}); start a new --out-dir") from None
    if scaler.is_enabled() and ckpt.get("scaler"):   # empty when saved by a bf16, fp32 or CPU run
        scaler.load_state_dict(ckpt["scaler"])
    mid = MidEpoch(**ckpt["within"]) if ckpt.get("within") else None
    if args.master:
        trim_log(os.path.join(args.out_dir, "log.jsonl"), ckpt["epoch"])
        at = f", step {mid.step} of epoch {ckpt['epoch'] + 1}" if mid else ""
        print(f"resumed from {path} at epoch {ckpt['epoch']}{at}")
    return mid


# ----------------------------------------------------------------------------- signals and mid-epoch checkpoints
@dataclasses.dataclass
class MidEpoch:
    """Where a run stopped inside an epoch (a checkpoint's "within"; "epoch" then counts the
    epochs completed): the steps taken, every rank's loss sums so far (LossSums.state_dict),
    and what else the epoch needs to go on (train.py: the E-step's tables, cluster.Assignment
    as a dict of CPU tensors, or None in a cluster warm-up epoch)."""
    step: int
    meter: dict
    assignment: dict = None


class Checkpoints:
    """Every checkpoint of a run, and stopping mid-epoch without losing it. save() writes one
    at the end of each epoch. SIGTERM (a preemption; Slurm's requeue and scancel; torchrun
    passing on its own SIGTERM) and SIGUSR1 (Slurm's --signal warning before the time limit)
    only set a flag. After each training step the ranks agree on it (poll: one all-reduce of
    two numbers, max over ranks, so a signal that reached one rank stops all), every rank
    finishes the same step, rank 0 writes a mid-epoch checkpoint, and the run exits with
    128 + the signal's number (the shell's code for "ended by that signal"; the run is
    unfinished). Rerunning the command continues at the next step, bit-identical to a run
    never stopped. A signal during train.py's feature pass or clustering waits for the first
    step (ImageNet: 1-3 min, within Slurm's --signal lead time in slurm.sbatch).
    --checkpoint-minutes: rank 0's clock also asks for a mid-epoch checkpoint, without
    stopping, when that long has passed since the last one (bounds what a kill -9 loses).
    save(epoch, steps, mid) is the program's own writer (train.save_checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, args, save):
        self.signum, self.minutes, self.writer, self.last = 0, args.checkpoint_minutes, save, time.time()
        self.before = {s: signal.signal(s, self._catch) for s in self.SIGNALS}

    def close(self):   # the handlers the program found (main() may be called from Python, e.g. a test)
        for s, h in self.before.items():
            signal.signal(s, h)

    def _catch(self, signum, frame):
        self.signum = signum

    def poll(self, args):
        """(signal number or 0, whether a timed checkpoint is due), equal on every rank."""
        due = args.master and self.minutes > 0 and time.time() - self.last > self.minutes * 60
        flags = torch.tensor([self.signum, int(due)])
        if args.distributed:
            flags = flags.to(utils.reduce_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, due = flags.tolist()
        return signum, bool(due)

    def save(self, epoch, steps, mid=None):
        self.writer(epoch, steps, mid)
        self.last = time.time()

    def after_step(self, i, steps, epoch, bar, args, mid):
        """After step i of an epoch (not its last: the epoch's end saves anyway): a mid-epoch
        checkpoint if a signal or the clock asks (mid() builds its MidEpoch), then the exit
        if it was a signal."""
        if i == steps - 1:
            return
        signum, due = self.poll(args)
        if signum or due:
            bar.close()
            self.save(epoch, steps, mid())
            if signum:
                self.exit(signum, f"epoch {epoch + 1}, step {i + 1}/{steps}", args)

    def after_epoch(self, epoch, steps, args):
        """The epoch's checkpoint, then the exit if a signal came during its last step."""
        self.save(epoch, steps)
        signum, _ = self.poll(args)
        if signum:
            self.exit(signum, f"the end of epoch {epoch + 1}", args)

    def exit(self, signum, where, args):
        if args.master:
            print(f"{signal.Signals(signum).name}: stopped at {where}, checkpoint saved in {args.out_dir}; "
                  f"{utils.rerun_hint(args)}", flush=True)
        if args.distributed:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(128 + signum)


# ----------------------------------------------------------------------------- loss sums and divergence
class LossSums:
    """An epoch's loss terms summed on the device (no synchronisation per step), the first
    term the loss itself, and the divergence check. Under fp16 a non-finite loss is a step
    that GradScaler skips (it halves the scale and goes on; the weights are untouched): it is
    left out of the sums, and only a long run of such steps in a row means divergence.
    Without a scaler a non-finite loss has already reached the weights: stop at once."""

    MAX_SKIPS_IN_A_ROW = 20   # the loss scale halved 20 times (1e-6): no longer an fp16 overflow

    def __init__(self, device, skips_allowed=False, terms=4):
        self.sums = torch.zeros(terms + 1, device=device)   # the terms, then the finite steps
        self.bad = torch.zeros((), device=device, dtype=torch.long)
        self.bad_run = torch.zeros((), device=device, dtype=torch.long)
        self.skips_allowed, self.steps, self.checked = skips_allowed, 0, 0

    def add(self, loss, *terms):
        ok = torch.isfinite(loss)
        terms = torch.stack([loss.detach(), *terms, torch.ones_like(loss)])
        self.sums += torch.where(ok, terms, torch.zeros_like(terms))
        self.bad += ~ok
        self.bad_run = (self.bad_run + 1) * ~ok
        self.steps += 1

    def check(self):
        """None, or what is wrong (synchronises with the device: call it every few steps)."""
        bad, run, window = int(self.bad), int(self.bad_run), self.steps - self.checked
        self.bad.zero_()
        self.checked = self.steps
        if bad and not self.skips_allowed:
            return f"the loss was not finite in {bad} of the last {window} steps"
        if run >= self.MAX_SKIPS_IN_A_ROW:
            return f"the loss was not finite in {run} steps in a row (fp16: GradScaler skipped each)"
        return None

    def means(self):
        s = self.sums.tolist()
        return [v / max(s[-1], 1) for v in s[:-1]]

    def state_dict(self):
        """For a mid-epoch checkpoint: every rank's sums so far (world x terms; a collective,
        every rank calls it); the divergence counters are this rank's."""
        sums = [self.sums.clone()]
        if utils.distributed():
            sums = [torch.zeros_like(self.sums) for _ in range(dist.get_world_size())]
            dist.all_gather(sums, self.sums.to(utils.reduce_device()).clone())
        return {"sums": torch.stack(sums).cpu(), "bad": self.bad.cpu(), "bad_run": self.bad_run.cpu(),
                "steps": self.steps, "checked": self.checked}

    def load_state_dict(self, sd, rank=0, world_size=1):
        """Each rank its own sums, so the epoch's all-reduce adds the same numbers in the same
        order as if never stopped (resumed on fewer ranks: rank 0 takes the rest)."""
        sums = sd["sums"]
        mine = sums[rank] if rank < len(sums) else torch.zeros_like(sums[0])
        if rank == 0 and len(sums) > world_size:
            mine = mine + sums[world_size:].sum(0)
        self.sums = mine.to(self.sums.device)
        self.bad, self.bad_run = sd["bad"].to(self.sums.device), sd["bad_run"].to(self.sums.device)
        self.steps, self.checked = sd["steps"], sd["checked"]


def check_divergence(meter, bar, epoch, step, args, advice):
    """Stop in one line when the loss has not been finite (LossSums.check), keeping the last
    good checkpoint; advice: what to change."""
    problem = meter.check()
    if problem:
        bar.close()
        ckpt = os.path.join(args.out_dir, "checkpoint.pth")
        kept = f"the last good checkpoint, {ckpt}, is kept" if os.path.exists(ckpt) else "no checkpoint was written yet"
        raise UserError(f"{problem} at epoch {epoch + 1}, step {step}: training diverged; {kept}. {advice}")
