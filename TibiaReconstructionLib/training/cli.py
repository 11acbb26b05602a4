"""`tibia-recon train step1|step2|step3 --config FILE [--resume]` and `tibia-recon export-bundle`."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def _train(args) -> int:
    from . import distributed
    from .config import load_config
    from .step1_registration import train_step1
    from .step2_autoencoders import train_step2
    from .step3_mask_robust import train_step3

    overrides = {"data": args.data, "out": args.out, "val_data": args.val_data}
    if args.step == "step3":
        overrides["step1"] = args.step1
    config = load_config(args.step, args.config, overrides)
    run = {"step1": train_step1, "step2": train_step2, "step3": train_step3}[args.step]
    finished = run(config, resume=args.resume, max_steps=args.max_steps)
    if distributed.is_main():
            print(f"{args.step}: {'finished' if finished else 'stopped at --max-steps; continue with --resume'}; "
              f"outputs in {config['out']}")
    return 0


def _export(args) -> int:
    from .export import export_bundle

    folder = export_bundle(args.step1, args.step3, args.ae, args.out, float16=args.float16, overwrite=args.overwrite,
                           locnet_from=args.locnet)
    print(f"bundle written to {folder}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "train", help="train step 1 (registration), 2 (autoencoders) or 3 (mask-robust models)",
        description="Train one step of the method on a canonical data set (see `tibia-recon prepare`). Default "
                    f"configurations (JSON) are in {CONFIG_DIR}. Paths in a configuration are relative to the "
                    "current folder; the options below override them. A run writes log.csv, curves.png, "
                    "checkpoints and its models into the output folder. Data-parallel on N GPUs (or CPU "
                    "processes): `torchrun --nproc_per_node N -m TibiaReconstructionLib.cli train ...`; "
                    "batch_size is then per process.")
    p.add_argument("step", choices=["step1", "step2", "step3"])
    p.add_argument("--config", help="JSON configuration (default: built-in defaults)")
    p.add_argument("--data", help="canonical data set folder (step 2/3: the aligned set written by step 1)")
    p.add_argument("--val-data", dest="val_data", help="canonical validation set folder")
    p.add_argument("--out", help="output folder")
    p.add_argument("--step1", help="step 3 only: the step-1 output folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help="stop after this many optimiser steps per model (resumable with --resume)")
    p.set_defaults(func=_train)

    e = sub.add_parser("export-bundle", help="assemble a model bundle from step 1 and step 3 outputs",
                       description="Write a model bundle (weights.safetensors + config.json) with the step-1 "
                                   "prototype and canonical grid, the step-3 mask-robust LocNet and one autoencoder.")
    e.add_argument("--step1", required=True, help="step-1 output folder")
    e.add_argument("--step3", required=True, help="step-3 output folder")
    e.add_argument("--ae", required=True, help="autoencoder name in the step-3 folder (e.g. vae, pca32) or a path")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--locnet", choices=("step3", "step1"), default="step3",
                   help="the query LocNet: the mask-robust one of step 3 (default, the paper's) or step 1's")
    e.add_argument("--float16", action="store_true", help="store the weights at half precision (half the size)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    e.set_defaults(func=_export)
