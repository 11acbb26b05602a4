"""The minibatch loop shared by all training steps: seeding, logging, checkpoints, exact resume.

A run lives in one folder: ``log.csv`` (every loss and the wall time of every step, and validation rows),
``checkpoint/`` (``state.safetensors`` with weights and optimizer tensors + ``state.json`` with
step, epoch, optimizer settings and the configuration fingerprint) and ``curves.png``.

Randomness is a function of (seed, step): the epoch's case order comes from (seed, epoch) and the
torch/numpy generators are reseeded before every step, so a resumed run repeats exactly what an
uninterrupted run would have done.

Under torchrun (see :mod:`.distributed`) a step takes a global batch of ``batch_size x world size``
cases from the epoch's order, each rank trains on its slice with generators seeded from (seed, step,
rank), the gradients are averaged, the logged losses are the means over the ranks, and rank 0 writes
the files. A checkpoint resumes only with the number of processes that made it.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..io import atomic_folder
from ..errors import InputError, OutputExistsError
from . import distributed

StepFn = Callable[[torch.Tensor, np.random.Generator, int], tuple[torch.Tensor | None, dict[str, float]]]


@dataclass
class RunSettings:
    seed: int
    epochs: int
    batch_size: int
    n_cases: int
    checkpoint_every: int = 100       # steps between checkpoints (and one at every epoch end)
    device: torch.device = torch.device("cpu")
    amp: bool = True                  # bfloat16 autocast, used on CUDA only
    max_steps: int | None = None      # stop (with a checkpoint) after this many steps in total
    world_size: int = field(default_factory=distributed.world)  # processes; batch_size is per process

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_cases / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


_NOT_FINGERPRINTED = ("out", "data", "val_data", "threads", "checkpoint_every", "epochs", "max_steps")


def fingerprint_of(settings):
    """``settings`` without what may change between a run and its resumption (paths, threads, checkpoint
    frequency, the number of epochs), at any depth."""
    if isinstance(settings, dict):
        return {k: fingerprint_of(v) for k, v in settings.items() if k not in _NOT_FINGERPRINTED}
    return settings


def seed_everything(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """Reseed torch from (seed, step, rank) and return a numpy generator for the same triple."""
    torch.manual_seed((seed * 1_000_003 + step + rank * 2 ** 40) % (2 ** 63))
    return np.random.default_rng([seed, step, rank] if rank else [seed, step])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n`` cases."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class TrainRun:
    """Runs ``step_fn`` over minibatches of case indices, with logging and resumable checkpoints.

    ``step_fn(indices, rng, epoch)`` returns (loss, parts); the runner back-propagates ``loss`` and
    steps ``optimizer``. A step function that updates the weights itself returns (None, parts); the
    optimizer's state is still checkpointed. ``val_fn(epoch)`` returns validation losses logged at each epoch end.
    """

    def __init__(self, folder, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                 settings: RunSettings, fingerprint: dict, resume: bool = False, desc: str = "") -> None:
        self.folder = Path(folder)
        self.modules, self.optimizer, self.settings = modules, optimizer, settings
        self.fingerprint = json.loads(json.dumps(fingerprint_of(fingerprint)))
        self.desc = desc or self.folder.name
        self.step = 0
        self.main = distributed.is_main()
        ckpt = self.folder / "checkpoint"
        if ckpt.exists() and not resume:
            raise OutputExistsError(f"{self.folder} already holds a training checkpoint. Continue it with --resume "
                                    f"or choose another output folder.")
        if resume and ckpt.exists():
            self._load_checkpoint(ckpt)
        if not distributed.same_everywhere(self.step):
            raise InputError(f"The training processes found different checkpoints in {ckpt}; put the output folder "
                             f"where every process sees the same files.")
        self.call = distributed.wrap(modules)
        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.log = CsvLog(self.folder / "log.csv", keep_up_to_step=self.step)
            if settings.world_size > 1:
                print(f"{self.desc}: DistributedDataParallel on {distributed.describe()}, batch {settings.batch_size} "
                      f"per process = global batch {settings.global_batch}")

    # -- the loop ------------------------------------------------------------------------------

    def run(self, step_fn: StepFn, val_fn: Callable[[int], dict[str, float]] | None = None) -> bool:
        """Train until ``epochs`` (True) or ``max_steps`` (False: stopped early, resumable)."""
        s = self.settings
        last = s.total_steps if s.max_steps is None else min(s.total_steps, s.max_steps)
        with tqdm(total=s.total_steps, initial=self.step, desc=self.desc, dynamic_ncols=True, leave=False,
                  disable=None if self.main else True) as bar:
            while self.step < last:
                epoch, in_epoch = divmod(self.step, s.steps_per_epoch)
                order = epoch_order(s.seed, epoch, s.n_cases)
                indices = torch.as_tensor(order[in_epoch * s.global_batch:(in_epoch + 1) * s.global_batch])
                for m in self.modules.values():
                    m.train()
                start = time.perf_counter()
                parts = self._one_step(step_fn, distributed.shard(indices), epoch)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.4g}", epoch=epoch)
                if not self.main:
                    continue
                self.log.write({"step": self.step, "epoch": epoch, "phase": "train", **parts,
                                "seconds": time.perf_counter() - start})
                epoch_end = self.step % s.steps_per_epoch == 0
                if epoch_end and val_fn is not None:
                    for m in self.modules.values():
                        m.eval()
                    with torch.no_grad():
                        self.log.write({"step": self.step, "epoch": epoch, "phase": "val", **val_fn(epoch)})
                if epoch_end or self.step % s.checkpoint_every == 0 or self.step == last:
                    self.save_checkpoint()
        if self.main:
            plot_curves(self.folder / "log.csv", self.folder / "curves.png")
        distributed.barrier()  # the other ranks go on once rank 0's checkpoint is written (a resume reads it)
        return self.step >= s.total_steps

    def _one_step(self, step_fn: StepFn, indices: torch.Tensor, epoch: int) -> dict[str, float]:
        rng = seed_everything(self.settings.seed, self.step, distributed.rank())
        use_amp = self.settings.amp and self.settings.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss, parts = self.call(step_fn, indices, rng, epoch)
        if loss is not None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            parts = {"loss": float(loss.detach()), **parts}
        parts = distributed.mean(parts)
        if not all(math.isfinite(v) for v in parts.values()):
            raise InputError(f"Training diverged at step {self.step} ({parts}); lower the learning rate in the "
                             f"configuration and start again.")
        return parts

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` atomically (a temporary folder renamed into place)."""
        tensors = {f"model.{name}.{k}": v.detach().cpu().contiguous()
                   for name, m in self.modules.items() for k, v in m.state_dict().items()}
        s = self.settings
        state = {"step": self.step, "epoch": self.step // s.steps_per_epoch,
                 "rng": "torch and numpy are reseeded from (seed, step, rank) before every step",
                 "world_size": s.world_size, "batch_per_process": s.batch_size, "global_batch": s.global_batch,
                 "fingerprint": self.fingerprint}
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            for idx, entries in opt["state"].items():
                for k, v in entries.items():
                    tensors[f"optimizer.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
            state["optimizer"] = {"param_groups": opt["param_groups"],
                                  "state_entries": {str(i): sorted(e) for i, e in opt["state"].items()}}
        with atomic_folder(self.folder / "checkpoint") as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")

    def _load_checkpoint(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if state["fingerprint"] != self.fingerprint:
            raise InputError(f"The checkpoint in {ckpt} was made with another configuration or data set; resume "
                             f"with the same configuration or start a new output folder.")
        if state.get("world_size", 1) != self.settings.world_size:
            raise InputError(f"The checkpoint in {ckpt} was made by {state['world_size']} training processes; resume "
                             f"with as many (torchrun --nproc_per_node {state['world_size']}).")
        tensors = load_file(str(ckpt / "state.safetensors"))
        for name, m in self.modules.items():
            prefix = f"model.{name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.optimizer is not None:
            opt = state["optimizer"]
            self.optimizer.load_state_dict({
                "param_groups": opt["param_groups"],
                "state": {int(i): {k: tensors[f"optimizer.{i}.{k}"] for k in keys}
                          for i, keys in opt["state_entries"].items()}})
        self.step = int(state["step"])


class CsvLog:
    """Appends rows to a CSV file; on resume, drops rows written after the checkpoint's step."""

    def __init__(self, path: Path, keep_up_to_step: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.exists() and keep_up_to_step > 0:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.fields = reader.fieldnames
                rows = [r for r in reader if int(r["step"]) <= keep_up_to_step]
            self._rewrite(rows)
        elif path.exists():
            path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row)
            self._rewrite([])
        new = [k for k in row if k not in self.fields]
        if new:  # a validation row may bring its own columns
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            self.fields += new
            self._rewrite(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def plot_curves(log_path: Path, png_path: Path) -> None:
    """One panel per logged quantity: training steps (light), their moving average, validation points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_path.exists():
        return
    with open(log_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [k for k in (rows[0] if rows else {}) if k not in ("step", "epoch", "phase", "seconds")]
    if not names:
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for phase, style in (("train", "-"), ("val", "o-")):
            pts = [(int(r["step"]), float(r[name])) for r in rows if r["phase"] == phase and r.get(name)]
            if not pts:
                continue
            x, y = np.array(pts).T
            if phase == "train":
                ax.plot(x, y, color="C0", alpha=0.3, lw=0.8)
                k = max(1, len(y) // 50)
                ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="C0", label="train")
            else:
                ax.plot(x, y, style, color="C1", label="validation")
        ax.set_ylabel(name)
        if all(float(r[name]) > 0 for r in rows if r.get(name)):
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
