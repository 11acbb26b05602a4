"""Training scaling: time per optimiser step and throughput of step 1 (LocNet + prototype) and step 3
(mask-robust LocNet, VAE) against the canonical grid size, in one process and in two DistributedDataParallel
processes (gloo); FLOPs and activation memory per case; a plan for the 1 mm grid on 8 GPUs.

Random tensors stand in for the data (the cost of a step does not depend on the values). Each step
does what the training step does (same models from the shipped configurations, same losses and
samplers, AdamW), through the same DDP wrapper as ``tibia-recon train`` under torchrun
(:mod:`TibiaReconstructionLib.training.distributed`). Writes scaling.md, scaling.csv, scaling.png:

    .venv/bin/python benchmarks/scaling.py --out docs/benchmarks [--grids 4mm 2mm 1mm] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from TibiaReconstructionLib.bench import machine_description, md_table, write_csv
from TibiaReconstructionLib.geometry import Grid
from TibiaReconstructionLib.models import AffineGridSampler, LocNet, Prototype, build_autoencoder, coarser_grid, \
    invert_theta
from TibiaReconstructionLib.training import distributed
from TibiaReconstructionLib.training.cli import CONFIG_DIR
from TibiaReconstructionLib.training.losses import dssim
from TibiaReconstructionLib.training.masking import random_thetas

# canonical grids (X, Y, Z voxels, spacing mm); "1mm-paper" is the paper's grid, for FLOPs and memory only
GRIDS = {"4mm": ((32, 32, 112), 4.0), "2mm": ((64, 64, 224), 2.0), "1mm": ((128, 128, 448), 1.0),
         "1mm-paper": ((128, 128, 256), 1.0)}
TIMED = {"4mm": (4, 6), "2mm": (4, 3), "1mm": (2, 2)}  # global batch, timed steps (after one warm-up step)
PROCESSES = ((1, 1), (1, 2), (2, 1))                  # (processes, threads per process) on the 2-core CPU
KINDS = {"step1": "step 1: LocNet + prototype, D-SSIM at 1/2 resolution",
         "step3-locnet": "step 3: mask-robust LocNet (random affine, D-SSIM at 1/2 + θ regression)",
         "step3-vae": "step 3: VAE, masked MSE + KL"}
FILES = {"md": "scaling.md", "csv": "scaling.csv", "plot": "scaling.png"}
# Assumptions of the GPU extrapolation (not measured here: this machine has no GPU)
# (conservative: 3D convolutions with 2-64 channels run far below the peaks of 990 TFLOP/s bf16 and 3.35 TB/s)
GPU = {"name": "H100 SXM 80 GB", "memory_gib": 80, "usable_gib": 64, "effective_tflops": 10.0, "hbm_tb_s": 1.0,
       "traffic_per_saved_byte": 3.0, "nvlink_gb_s": 450.0, "pcie_gb_s": 25.0, "overhead_ms_per_step": 10.0,
       "global_batch": 16}


def _configs() -> tuple[dict, dict]:
    step1 = json.loads((CONFIG_DIR / "step1.json").read_text(encoding="utf-8"))
    step3 = json.loads((CONFIG_DIR / "step3.json").read_text(encoding="utf-8"))
    return step1, step3


def build_step(kind: str, grid_name: str, batch: int):
    """(modules, loss function) of one training step of ``kind`` on random tensors of the grid."""
    size, spacing = GRIDS[grid_name]
    grid = Grid(size, np.full(3, spacing), -(np.array(size) - 1) / 2 * spacing)
    step1, step3 = _configs()
    x = torch.rand(batch, 2, *grid.shape)
    visible = (torch.rand(batch, 1, *grid.shape) > 0.2).float()
    small = AffineGridSampler(coarser_grid(grid, 2))
    if kind == "step1":
        locnet = LocNet({**step1["locnet"], "in_channels": 2})
        prototype = Prototype(2, coarser_grid(grid, 2).shape)
        return {"locnet": locnet, "prototype": prototype}, \
            lambda: dssim(small(F.avg_pool3d(x, 2), locnet(x)), prototype(), step1["ssim_window"]).mean()
    if kind == "step3-locnet":
        locnet = LocNet({**step1["locnet"], "in_channels": 2})
        sampler = AffineGridSampler(grid)
        aug = step3["augment"]
        theta_r = random_thetas(np.random.default_rng(0), batch, aug["max_angle_deg"], aug["max_translation_mm"],
                                tuple(aug["scale"]))
        theta_true, theta_r = invert_theta(theta_r).float(), theta_r.float()

        def loss():
            with torch.no_grad():
                x_t = sampler(x * visible, theta_r)
                seen = (small(small(F.avg_pool3d(visible, 2), theta_r), theta_true) > 0.5).float()
            theta = locnet(x_t)
            image = dssim(F.avg_pool3d(x, 2) * seen, small(F.avg_pool3d(x_t, 2), theta), 7).mean()
            return image + ((locnet.parameter_vector(theta) - locnet.parameter_vector(theta_true)) ** 2).mean()
        return {"locnet": locnet}, loss
    vae = build_autoencoder({"type": "vae", **step3["autoencoders"]["vae"]["arch"], "in_channels": 2})
    return {"vae": vae}, lambda: vae.loss(x * visible, x, visible)[0]


def cost_per_case(kind: str, grid_name: str) -> dict:
    """FLOPs of forward + backward (convolutions and matrix products), bytes saved for backward (activations,
    each storage once) for one case, and the parameter count."""
    modules, loss_fn = build_step(kind, grid_name, 1)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
    params = sum(p.numel() for m in modules.values() for p in m.parameters())
    return {"gflop_per_case": round(flops.get_total_flops() / 1e9, 3),
            "activation_mib_per_case": round(sum(saved.values()) / 2**20, 1), "params": params}


def _rank(rank: int, world: int, threads: int, port: int, jobs: list, results) -> None:
    """One training process: time every job (kind, grid) with this rank's share of the global batch."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    distributed.init(torch.device("cpu"))
    for kind, grid_name in jobs:
        batch, steps = TIMED[grid_name]
        torch.manual_seed(rank)
        modules, loss_fn = build_step(kind, grid_name, batch // world)
        call = distributed.wrap(modules)
        optimizer = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=1e-4)

        def step():
            loss = call(loss_fn)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step()
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        distributed.barrier()
        seconds = (time.perf_counter() - start) / steps
        allreduce = _allreduce_seconds(sum(p.numel() for m in modules.values() for p in m.parameters()))
        if distributed.is_main():
            results.put({"step": kind, "grid": grid_name, "processes": world, "threads_per_process": threads,
                         "batch_per_process": batch // world, "global_batch": batch, "steps_timed": steps,
                         "s_per_step": round(seconds, 4), "cases_per_s": round(batch / seconds, 3),
                         "allreduce_ms": round(allreduce * 1e3, 2) if world > 1 else ""})


def _allreduce_seconds(n_params: int, repeat: int = 5) -> float:
    """Time of one all-reduce of ``n_params`` fp32 values (the gradients of a step) alone, 0 without peers."""
    if distributed.world() == 1:
        return 0.0
    flat = torch.zeros(n_params)
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(repeat):
        dist.all_reduce(flat)
    return (time.perf_counter() - start) / repeat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(grids: list[str]) -> list[dict]:
    """Time every kind on every grid for each (processes, threads) setting, each setting in fresh processes."""
    rows = []
    ctx = mp.get_context("spawn")
    jobs = [(kind, g) for g in grids for kind in KINDS]
    for world, threads in PROCESSES:
        results = ctx.SimpleQueue()
        mp.start_processes(_rank, (world, threads, _free_port(), jobs, results), nprocs=world, start_method="spawn")
        while not results.empty():
            rows.append(results.get())
        print(f"  {world} process(es) x {threads} thread(s): done", flush=True)
    return rows


def gpu_plan(costs: dict, n_cases: int, gpus: int) -> list[list]:
    """Per kind at the 1 mm grids: memory per case, the batch that would fit, time per step and per epoch on
    ``gpus`` GPUs with the paper's global batch (``GPU["batch_per_gpu"]`` x ``gpus``)."""
    rows = []
    steps = math.ceil(n_cases / GPU["global_batch"])
    for grid_name in ("1mm", "1mm-paper"):
        voxels = int(np.prod(GRIDS[grid_name][0]))
        for kind in KINDS:
            c = costs[(kind, grid_name)]
            per_case_gib = c["activation_mib_per_case"] / 1024 / 2  # bf16 autocast about halves the activations
            t_flop = c["gflop_per_case"] * 1e9 / (GPU["effective_tflops"] * 1e12)
            t_mem = per_case_gib * 2**30 * GPU["traffic_per_saved_byte"] / (GPU["hbm_tb_s"] * 1e12)
            t_copy = 2 * voxels * 2 / (GPU["pcie_gb_s"] * 1e9)  # the float16 case from host memory to the GPU
            per_case = max(t_flop, t_mem) + t_copy
            allreduce = 2 * c["params"] * 4 / (GPU["nvlink_gb_s"] * 1e9)  # ring all-reduce of fp32 gradients
            overhead = GPU["overhead_ms_per_step"] / 1e3
            epoch = {n: steps * (GPU["global_batch"] / n * per_case + overhead + (allreduce if n > 1 else 0))
                     for n in (1, gpus)}
            rows.append([kind, "x".join(map(str, GRIDS[grid_name][0])), f"{per_case_gib:.2f}",
                         int(GPU["usable_gib"] // per_case_gib), f"{t_flop * 1e3:.1f}", f"{t_mem * 1e3:.1f}",
                         f"{t_copy * 1e3:.1f}", f"{epoch[1]:.1f}", f"{epoch[gpus]:.1f}",
                         f"{epoch[gpus] * 1000 / 3600:.2f}"])
    return rows


def report(rows: list[dict], costs: dict, grids: list[str], command: str, paths: dict) -> str:
    m = machine_description()
    lines = [
        "# Training scaling", "",
        f"Generated on {time.strftime('%Y-%m-%d %H:%M %Z')} by:", "", f"    {command}", "",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB "
        f"RAM, GPU: {m['gpu']}; shared with other jobs while measuring (times are upper bounds).",
        f"- Software: TibiaReconstructionLib {m['library']} (git {m['git_commit']}), torch {m['torch']}, "
        f"Python {m['python']}, {m['os']}.",
        "- What a step is: one AdamW step on a global batch of random tensors (2 channels, the grid's shape), the "
        "models of the shipped configurations (`configs/step1.json` LocNet [8, 16, 32, 64], prototype at 1/2 "
        "resolution; `configs/step3.json` VAE [8, 16, 32, 64], latent 8), the losses of the training code, fp32; "
        "one warm-up step, then the mean of the timed steps. Two processes run DistributedDataParallel (gloo) "
        "through the wrapper `tibia-recon train` uses under torchrun, each with half of the global batch. Every "
        "setting runs in fresh processes.", "",
        "## Measured: time per step and throughput", "",
        "*Measured* on this machine. s/case = time per step / global batch.", "",
    ]
    table = []
    for r in rows:
        c = costs[(r["step"], r["grid"])]
        table.append([r["step"], "x".join(map(str, GRIDS[r["grid"]][0])), GRIDS[r["grid"]][1], r["processes"],
                      r["threads_per_process"], f"{r['batch_per_process']} x {r['processes']} = {r['global_batch']}",
                      r["s_per_step"], f"{r['s_per_step'] / r['global_batch']:.3f}", r["cases_per_s"],
                      f"{c['gflop_per_case'] * r['cases_per_s']:.1f}"])
    lines += [md_table(["step", "grid (voxels)", "mm", "processes", "threads each", "batch per process x processes",
                        "s/step", "s/case", "cases/s", "achieved GFLOP/s"], table), "",
              f"![s/case against voxels, 1 and 2 processes]({paths['plot'].name})", ""]
    lines += _findings(rows, grids)
    lines += ["## Counted: FLOPs and activation memory per case", "",
              "*Counted* exactly in one step at batch 1 on the CPU: FLOPs of the convolutions and matrix products "
              "of forward + backward (`torch.utils.flop_counter`; grid sampling and element-wise operations are "
              "not counted, they are memory-bound), and the bytes autograd saves for the backward pass (fp32 "
              "activations, each storage once: the bulk of training memory). Parameters + AdamW state are 16 "
              "bytes per parameter, negligible here. `128x128x256` is the paper's 1 mm grid (counted only).", ""]
    lines += [md_table(["step", "grid (voxels)", "GFLOP per case (fwd + bwd)", "activations per case (MiB, fp32)",
                        "parameters"],
                       [[k, "x".join(map(str, GRIDS[g][0])), c["gflop_per_case"], c["activation_mib_per_case"],
                         c["params"]] for (k, g), c in costs.items()]), ""]
    n_cases, gpus = 400, 8
    lines += [
        "## Plan: training at 1 mm on 8 GPUs with torchrun (extrapolated)", "",
        "Launch (one node, 8 GPUs; `batch_size` in the configuration is per GPU, the global batch is 8 x that; "
        "nccl, one process per GPU, rank 0 writes the files):", "",
        "    torchrun --standalone --nproc_per_node 8 -m TibiaReconstructionLib.cli train step1 "
        "--config step1-1mm.json", "",
        f"*Extrapolated* from the counted FLOPs and bytes, not measured: this machine has no GPU. Assumptions "
        f"({GPU['name']}, deliberately conservative): convolutions at {GPU['effective_tflops']:.0f} TFLOP/s "
        f"effective (1% of the bf16 dense peak: 3D convolutions with 2-64 channels are far from it); activations "
        f"in bf16 under autocast (half the fp32 bytes counted above); each saved byte costs "
        f"{GPU['traffic_per_saved_byte']:.0f} bytes of memory traffic (written in forward, read in backward, its "
        f"gradient written) at {GPU['hbm_tb_s']} TB/s effective (30% of HBM3's peak); the float16 case copied "
        f"from host memory at {GPU['pcie_gb_s']:.0f} GB/s; {GPU['usable_gib']} of {GPU['memory_gib']} GiB usable "
        f"for activations; fp32 gradients all-reduced over NVLink at {GPU['nvlink_gb_s']:.0f} GB/s; "
        f"{GPU['overhead_ms_per_step']:.0f} ms per step for kernel launches, Python and the optimiser. Time per "
        f"case = max(FLOP time, memory time) + copy time. Epoch: {n_cases} cases (the default recipe's data set "
        f"size) at the paper's global batch of {GPU['global_batch']} ({GPU['global_batch'] // gpus} per GPU on "
        f"{gpus} GPUs): {math.ceil(n_cases / GPU['global_batch'])} steps.", "",
        md_table(["step", "grid (voxels)", "activations per case (GiB, bf16)", "batch per GPU that would fit",
                  "FLOP time per case (ms)", "memory time per case (ms)", "copy per case (ms)", "epoch on 1 GPU (s)",
                  f"epoch on {gpus} GPUs (s)", f"1000 epochs on {gpus} GPUs (h)"], gpu_plan(costs, n_cases, gpus)),
        "",
    ]
    lines += _plan_notes(rows, costs, grids)
    return "\n".join(lines) + "\n"


def _rate(rows, kind, grid, processes, threads):
    return next((r["cases_per_s"] for r in rows if (r["step"], r["grid"], r["processes"],
                                                       r["threads_per_process"]) == (kind, grid, processes, threads)),
                None)


def _findings(rows: list[dict], grids: list[str]) -> list[str]:
    out = ["What the numbers say:", ""]
    for kind in KINDS:
        pairs = [(g, _rate(rows, kind, g, 1, 2), _rate(rows, kind, g, 2, 1)) for g in grids]
        ddp = ", ".join(f"{g}: {two / one:.2f}x" for g, one, two in pairs if one and two)
        best = [(g, max(r["cases_per_s"] for r in rows if (r["step"], r["grid"]) == (kind, g))) for g in grids]
        growth = ", ".join(f"{a[0]} -> {b[0]}: {a[1] / b[1]:.1f}x" for a, b in zip(best, best[1:]))
        out.append(f"- {kind}: s/case of the fastest setting grows with the grid ({growth}; the voxel count grows "
                   f"8x per halving of the spacing); 2 processes x 1 thread against 1 process x 2 threads: {ddp} "
                   "the throughput.")
    shares = [r["allreduce_ms"] / 1e3 / r["s_per_step"] for r in rows if r["processes"] > 1]
    out += ["- The epoch time is (cases / global batch) x time per step: the runner does nothing per case besides "
            "the step (plus a checkpoint per epoch and the optional validation pass), so it grows linearly with "
            "the data set size: a 400-case epoch at 2 mm costs 400 x the s/case above.",
            "- On this 2-core CPU two processes add no compute (1 process x 2 threads uses both cores too); the "
            "rows show that DDP runs and what it costs here. The gradient all-reduce alone (gloo, timed "
            f"separately, column `allreduce_ms` of the CSV) takes {100 * min(shares):.1f}-{100 * max(shares):.1f}% "
            "of a 2-process step; the rest of the gap is the ranks waiting for each other: every step waits for "
            "the slower rank, and on this machine, shared with other jobs (load average below), one rank often "
            "waits for a core. On GPUs each process has its own device, so throughput grows with the number of "
            "GPUs until the per-step overhead dominates (see the plan).", ""]
    return out


def _plan_notes(rows, costs, grids) -> list[str]:
    step1, _ = _configs()
    c1, c2 = costs[("step3-vae", "1mm")], costs[("step3-vae", "2mm")]
    return [
        "Notes on the plan:", "",
        f"- Memory scales with the voxel count: the VAE saves {c2['activation_mib_per_case']:.0f} MiB per case at "
        f"2 mm and {c1['activation_mib_per_case']:.0f} MiB at 1 mm (fp32; counted). The 1 mm grid fits easily on "
        "an 80 GB GPU at the paper's batch; memory leaves room for larger batches or wider models.",
        "- The shipped architectures are small (8-64 channels, < 0.5 M parameters besides the prototype): even "
        "under these conservative assumptions a 1 mm epoch takes seconds on one GPU, and at 2 cases per GPU the "
        "8-GPU run is dominated by the per-step overhead. DDP pays off for wider models (the paper's budget of "
        "1000 epochs leaves room for 10-50x the FLOPs per case) or larger data sets; the memory column shows "
        "how far the batch can grow.",
        _cpu_epoch(rows),
        "- FLOPs and bytes scale with the voxel count (8x per halving of the spacing; the measured CPU s/case "
        "above grows by about that much), so the 1 mm costs are the 2 mm costs x 8: the rows of the plan follow "
        "from the counted numbers, not from a guess of the scaling.",
        "- Data: every process holds the whole canonical data set in host memory (float16): 2 x 128 x 128 x 448 "
        "x 2 bytes = 29 MiB per case, 11.5 GiB for 400 cases, x 8 processes = 92 GiB of host RAM; plan a node "
        "with >= 256 GB RAM, or fewer cases per process (not implemented: ranks do not share the tensors).",
        f"- The paper trains step 1 for 1000 epochs at lr 1e-5, batch 16; with 8 GPUs keep the global batch at "
        f"16 (`batch_size` 2 per GPU) or scale the learning rate with it. The shipped configuration "
        f"(`configs/step1.json`) uses {step1['epochs']} epochs on a CPU at 2 mm.",
        "- PCA (steps 2/3) is fitted by rank 0 alone; at 1 mm with 400 cases its data matrix is 400 x 14.7 M "
        "values (fp32: 22 GiB): fit it on a node with that much RAM, or at 2 mm.",
        "- Step 1 'direct' mode (one θ per case) runs in one process only.", "",
    ]


def _cpu_epoch(rows: list[dict]) -> str:
    """The measured 1 mm CPU throughput as an epoch time (400 cases), for comparison."""
    best = {}
    for r in rows:
        if r["grid"] == "1mm":
            best[r["step"]] = max(best.get(r["step"], 0.0), r["cases_per_s"])
    if not best:
        return "- (The 1 mm grid was not timed on this CPU in this run.)"
    parts = ", ".join(f"{k} {400 / v / 60:.0f} min" for k, v in best.items())
    return (f"- For comparison, *measured* here at 1 mm, the best CPU setting gives 400-case epochs of: {parts} "
            f"(1000 epochs: {1000 * 400 / min(best.values()) / 86400:.0f} days for the slowest).")


def plot(rows: list[dict], grids: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for (procs, threads), style in zip(PROCESSES, ("o--", "o-", "s-")):
            pts = [(np.prod(GRIDS[r["grid"]][0]), r["s_per_step"] / r["global_batch"]) for r in rows
                   if r["step"] == kind and (r["processes"], r["threads_per_process"]) == (procs, threads)]
            if pts:
                x, y = np.array(sorted(pts)).T
                label = f"{procs} process{'es' * (procs > 1)} x {threads} thread{'s' * (threads > 1)}"
                ax.plot(x, y, style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("voxels in the canonical grid")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds per case (training step / batch)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks", help="folder of scaling.md, scaling.csv, scaling.png")
    parser.add_argument("--grids", nargs="+", default=list(TIMED), choices=list(TIMED), help="grids to time")
    parser.add_argument("--overwrite", action="store_true", help="replace existing report files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    paths = {k: out / v for k, v in FILES.items()}
    if not args.overwrite and any(p.exists() for p in paths.values()):
        parser.error(f"{out} already holds a scaling report; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(w) for w in [".venv/bin/python", "benchmarks/scaling.py", *(argv or sys.argv[1:])])
    started, load = time.perf_counter(), os.getloadavg()[0]
    costs = {(k, g): cost_per_case(k, g) for g in GRIDS for k in KINDS}
    rows = measure(args.grids)
    rows.sort(key=lambda r: (list(KINDS).index(r["step"]), list(GRIDS).index(r["grid"]), r["processes"],
                             r["threads_per_process"]))
    write_csv([{**r, "voxels": int(np.prod(GRIDS[r["grid"]][0])), **costs[(r["step"], r["grid"])]} for r in rows],
              paths["csv"], overwrite=True)
    plot(rows, args.grids, paths["plot"])
    text = report(rows, costs, args.grids, command, paths)
    text += (f"Total benchmark time: {time.perf_counter() - started:.0f} s; load average (1 min) "
             f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs.\n")
    paths["md"].write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
