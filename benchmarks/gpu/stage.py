"""Helpers of benchmarks/gpu/train_fine.sh: write a stage's configuration, and size its epochs to a time budget.

    python benchmarks/gpu/stage.py config SRC DST key=value ... -key ...   (key: dotted path, value: JSON;
                                                                     -key removes that entry)
    python benchmarks/gpu/stage.py epochs LOG_CSV STEPS_PER_EPOCH BUDGET_S MAX_EPOCHS

`epochs` reads the per-step wall times a probe run logged (`seconds` of the training rows, the first
10 steps left out as warm-up when there are more), adds 15% and 0.3 s per epoch for logging and
checkpoints, and prints the number of epochs (at least the ones the probe finished, at most
MAX_EPOCHS) that fit in BUDGET_S seconds of training in all, probe included.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path


def write_config(src: str, dst: str, settings: list[str]) -> None:
    config = json.loads(Path(src).read_text(encoding="utf-8"))
    for item in settings:
        remove = item.startswith("-")
        key, value = (item[1:], None) if remove else item.split("=", 1)
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        if remove:
            del node[last]
        else:
            node[last] = json.loads(value)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(json.dumps(config, indent=1), encoding="utf-8")
    print(f"config {dst}: {' '.join(settings)}")


def fit_epochs(log_csv: str, steps_per_epoch: int, budget_s: float, max_epochs: int) -> int:
    with open(log_csv, newline="", encoding="utf-8") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r["phase"] == "train"]
    done = len(seconds) // steps_per_epoch
    timed = seconds[10:] if len(seconds) > 20 else seconds
    step_s = sum(timed) / len(timed)
    epoch_s = 1.15 * step_s * steps_per_epoch + 0.3
    epochs = max(done, min(max_epochs, math.floor(budget_s / epoch_s)))
    print(f"{log_csv}: {len(seconds)} probe steps, {step_s * 1000:.1f} ms/step -> {epoch_s:.2f} s/epoch; "
          f"budget {budget_s:.0f} s -> {epochs} epochs (cap {max_epochs})", file=sys.stderr)
    return epochs


def main(argv: list[str]) -> int:
    if argv[:1] == ["config"] and len(argv) >= 3:
        write_config(argv[1], argv[2], argv[3:])
    elif argv[:1] == ["epochs"] and len(argv) == 5:
        print(fit_epochs(argv[1], int(argv[2]), float(argv[3]), int(argv[4])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
