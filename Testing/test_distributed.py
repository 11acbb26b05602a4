"""Data-parallel training: `torchrun --nproc_per_node 2` (gloo, CPU) on the toy data of test_training.

The module is also the worker script torchrun starts: it runs `tibia-recon train` commands and, after
every training run, saves each rank's weights so the test can compare the ranks.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from TibiaReconstructionLib.canonical import CanonicalDataset, write_canonical_dataset
from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.training.config import load_config
from TibiaReconstructionLib.training.step1_registration import train_step1

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "TibiaReconstructionLib" / "training" / "configs" / "tiny"
# No batch-mean anchors: the loss is then a mean of per-case terms, and 2 ranks x 2 cases equal 1 x 4.
STEP1 = {**json.loads((TINY / "step1.json").read_text(encoding="utf-8")), "epochs": 2, "batch_size": 2,
         "anchor_linear": 0.0, "anchor_translation": 0.0}
STEP3 = json.loads((TINY / "step3.json").read_text(encoding="utf-8"))
STEP3["locnet"]["epochs"] = STEP3["autoencoders"]["vae"]["epochs"] = 1


def _worker(dumps: Path, commands: list[list[str]]) -> None:
    from TibiaReconstructionLib.cli import main
    from TibiaReconstructionLib.training import distributed, runner

    original = runner.TrainRun.run

    def run_and_dump(self, *args):
        finished = original(self, *args)
        save_file({f"{n}.{k}": v.contiguous() for n, m in self.modules.items() for k, v in m.state_dict().items()},
                  str(dumps / f"{self.folder.name}.rank{distributed.rank()}.safetensors"))
        return finished

    runner.TrainRun.run = run_and_dump
    for argv in commands:
        assert main(argv) == 0, argv


def _log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["phase"] == "train"]


def test_two_processes_train_like_one_process_with_the_global_batch(tmp_path):
    from test_training import TOY_GRID, _cases, toy_cases

    data, out, dumps = tmp_path / "data", tmp_path / "ddp", tmp_path / "dumps"
    dumps.mkdir()
    images, inputs, visible, _ = toy_cases(8, fractured=True)
    write_canonical_dataset(data, TOY_GRID, (-200, 1800), _cases(8), images, inputs, visible)
    config, config3 = tmp_path / "step1.json", tmp_path / "step3.json"
    config.write_text(json.dumps(STEP1), encoding="utf-8")
    config3.write_text(json.dumps(STEP3), encoding="utf-8")
    step1 = ["train", "step1", "--config", str(config), "--data", str(data), "--out", str(out / "s1")]
    commands = [step1 + ["--max-steps", "2"], step1 + ["--resume"],
                ["train", "step3", "--config", str(config3), "--data", str(out / "s1" / "aligned"),
                 "--step1", str(out / "s1"), "--out", str(out / "s3")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(dumps), json.dumps(commands)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step1: finished") == 1 and "global batch 4" in done.stdout

    # every rank ends with the same weights, in every training run (step 1, step-3 LocNet, VAE)
    for run in ("s1", "locnet", "vae"):
        ranks = [load_file(dumps / f"{run}.rank{r}.safetensors") for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), run
    # one set of files, written once: rows of steps 1..4 (2 before the interruption, 2 after the resume)
    s1 = out / "s1"
    assert sorted(p.name for p in s1.iterdir()) == ["aligned", "checkpoint", "curves.png", "log.csv", "model.json",
                                                    "model.safetensors"]
    assert [r["step"] for r in _log(s1)] == ["1", "2", "3", "4"]
    state = json.loads((s1 / "checkpoint" / "state.json").read_text(encoding="utf-8"))
    assert (state["world_size"], state["batch_per_process"], state["global_batch"]) == (2, 2, 4)
    assert all((out / "s3" / name / "model.json").is_file() for name in ("locnet", "pca4", "vae"))
    losses = [float(r["loss"]) for r in _log(s1)]
    assert np.mean(losses[2:]) < np.mean(losses[:2])  # epoch 1 below epoch 0

    # one process with the same global batch (4) gives the same losses and weights
    single = load_config("step1", config, {"data": str(data), "out": str(tmp_path / "single")})
    assert train_step1({**single, "batch_size": 4})
    np.testing.assert_allclose(losses, [float(r["loss"]) for r in _log(tmp_path / "single")], rtol=1e-5)
    a, b = load_file(s1 / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    # (conv biases before an instance norm have no effect and a zero gradient: rounding noise that Adam scales up)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=5e-5) for k in a if "conv.bias" not in k)
    thetas = [[c["theta"] for c in CanonicalDataset(f / "aligned").cases] for f in (s1, tmp_path / "single")]
    np.testing.assert_allclose(*thetas, atol=1e-3)
    # the 2-process checkpoint holds the final weights and resumes only with 2 processes
    ckpt = load_file(s1 / "checkpoint" / "state.safetensors")
    assert torch.equal(ckpt["model.prototype.tensor"], a["prototype"])
    with pytest.raises(InputError, match="made by 2 training processes"):
        train_step1({**load_config("step1", config, {"data": str(data), "out": str(s1)}), "epochs": 3}, resume=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
