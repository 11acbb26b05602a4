"""Pack canonical training data small enough to travel to the GPU machine, and unpack it there.

    python benchmarks/gpu/fine_data.py pack DATASET [DATASET ...] --out .gpu/fine-data.npz [--cases N]
    python benchmarks/gpu/fine_data.py unpack .gpu/fine-data.npz --out data/train-fine [--device cuda]

The GPU machine has no SimpleITK or VTK, so phantoms cannot be made there; its working tree may carry
at most 64 MiB, a third of which the repository itself takes. `pack` keeps what `tibia-recon train
step1` and `train step3` (PCA and VAE, LocNet from step 1) read: the healthy images (intensity and
occupancy), the grid and the cases' manifest entries. It drops the fractured inputs and fracture masks
(step 3 then masks with random boxes only). Per voxel:

* occupancy rounded to 1/63 (6 bits; |error| <= 1/126): a partial-volume fraction, no noise to keep;
* intensity rounded to 1/255 (8 bits; |error| <= 1/510 = 3.9 HU of the 2000 HU window, RMS 2.3 HU),
  far below the CT noise left in the canonical tensors (10-17 HU SD at 1.5 mm);
* both only on the voxels where either is nonzero (a bit mask), the rest is 0 as in the data.

Intensity is coded losslessly (at 8 bits) as the residual of an integer linear prediction from the
three previous Z slices and the occupancy, with least-squares weights per case and per context
(interior / boundary voxels), then LZMA: about 4.6 bits per tibia voxel instead of 8. Mask and
occupancy values go through bzip2. The prediction
uses only earlier slices, so `unpack` decodes slice by slice, all cases at once (torch; on the GPU
there; the first two cases are decoded again on the CPU and must agree exactly). `unpack` writes a
canonical data set folder (manifest.json + tensors.safetensors) as `tibia-recon prepare` does, with only
the 'images' tensor.
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

FORMAT = "tibia-recon-gpu-pack/1"
INTENSITY_LEVELS = 255
OCCUPANCY_LEVELS = 63
SCALE_BITS = 12  # prediction weights are integers / 2^SCALE_BITS
# Neighbours (dz, dy, dx) of the predicted voxel whose intensities feed the prediction: earlier slices only.
OFFSETS = [(1, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] + [(2, 0, 0), (3, 0, 0), (2, 1, 0), (2, -1, 0),
                                                                      (2, 0, 1), (2, 0, -1)]
N_FEATURES = len(OFFSETS) + 3 + 1  # + occupancy terms + bias
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 4, "lp": 0, "pb": 0}]


def shifted(plane: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``plane`` (N, Y, X) moved by (dy, dx): out[y, x] = plane[y - dy, x - dx], zero outside."""
    out = torch.zeros_like(plane)
    ny, nx = plane.shape[-2:]
    out[:, max(dy, 0):ny + min(dy, 0), max(dx, 0):nx + min(dx, 0)] = \
        plane[:, max(-dy, 0):ny - max(dy, 0), max(-dx, 0):nx - max(dx, 0)]
    return out


def slice_features(intensity: torch.Tensor, occupancy: torch.Tensor, z: int) -> torch.Tensor:
    """Integer features (N, F, Y, X) (int64) predicting slice ``z`` of ``intensity`` (N, Z, Y, X) from its
    slices z-1..z-3 and ``occupancy`` at z and z-1; slices before 0 are zeros. Exact on any device."""
    n, _, ny, nx = intensity.shape

    def plane(volume, k):
        return volume[:, k].long() if k >= 0 else torch.zeros(n, ny, nx, dtype=torch.long, device=volume.device)

    feats = [shifted(plane(intensity, z - dz), dy, dx) for dz, dy, dx in OFFSETS]
    o, o_prev, i_prev = plane(occupancy, z), plane(occupancy, z - 1), plane(intensity, z - 1)
    feats += [o, torch.div(o * i_prev, o_prev.clamp_min(1), rounding_mode="floor"), o * o, torch.ones_like(o)]
    return torch.stack(feats, 1)


def predict(feats: torch.Tensor, weights: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    """Integer prediction (N, Y, X) in [0, 255]: weights (N, 2, F) for boundary / interior voxels."""
    acc = (feats[:, None] * weights[:, :, :, None, None]).sum(2)  # no integer matmul on CUDA
    acc = torch.where(interior, acc[:, 1], acc[:, 0])
    return torch.div(acc + (1 << (SCALE_BITS - 1)), 1 << SCALE_BITS, rounding_mode="floor").clamp(0, 255)


def zigzag(r: np.ndarray) -> np.ndarray:
    r = ((r.astype(np.int64) + 128) % 256) - 128
    return np.where(r >= 0, 2 * r, -2 * r - 1).astype(np.uint8)


def unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int64)
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def quantise(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intensity levels, occupancy levels) as int32 (N, Z, Y, X) from images (N, 2, Z, Y, X) in [0, 1]."""
    x = images.float()
    return (torch.round(x[:, 0] * INTENSITY_LEVELS).to(torch.int32),
            torch.round(x[:, 1] * OCCUPANCY_LEVELS).to(torch.int32))


def fit_weights(qi: torch.Tensor, qo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Least-squares prediction weights (2, F) as integers, for one case (Z, Y, X)."""
    rows, target, inner = [], [], []
    for z in range(qi.shape[0]):
        m = mask[z]
        if not m.any():
            continue
        f = slice_features(qi[None], qo[None], z)[0]
        rows.append(f[:, m].T.double())
        target.append(qi[z][m].double())
        inner.append(qo[z][m] == OCCUPANCY_LEVELS)
    a, y, inner = torch.cat(rows), torch.cat(target), torch.cat(inner)
    weights = torch.zeros(2, N_FEATURES, dtype=torch.float64)
    for ctx, sel in enumerate((~inner, inner)):
        if sel.sum() > N_FEATURES:
            weights[ctx] = torch.linalg.lstsq(a[sel], y[sel, None], driver="gelsd").solution[:, 0]
        else:
            weights[ctx, OFFSETS.index((1, 0, 0))] = 1.0
    return torch.round(weights * (1 << SCALE_BITS)).long()


def pack(datasets: list[str], out: str, max_cases: int | None = None, batch: int = 8) -> dict:
    """Pack the 'images' of ``datasets`` (same grid) into one file; returns size and error statistics."""
    t0 = time.time()
    manifests = [json.loads((Path(d) / "manifest.json").read_text(encoding="utf-8")) for d in datasets]
    grid = manifests[0]["grid"]
    if any(m["grid"] != grid or m["window_hu"] != manifests[0]["window_hu"] for m in manifests):
        raise SystemExit("pack: the data sets differ in grid or HU window")
    sources = [(d, i) for d, m in zip(datasets, manifests) for i in range(len(m["cases"]))][:max_cases]
    cases = [manifests[datasets.index(d)]["cases"][i] for d, i in sources]
    keep = ("id", "side", "seed", "spacing", "fracture_type", "patient_to_canonical")
    cases = [{k: c[k] for k in keep if k in c} for c in cases]
    masks, occ, res, nnz, weights = [], [], [], [], []
    err = {"intensity_max": 0.0, "intensity_sq": 0.0, "occupancy_max": 0.0, "occupancy_sq": 0.0, "voxels": 0}
    files = {d: safe_open(str(Path(d) / "tensors.safetensors"), framework="pt") for d in datasets}
    for a in range(0, len(sources), batch):
        group = sources[a:a + batch]
        images = torch.stack([files[d].get_slice("images")[i:i + 1][0] for d, i in group])
        qi, qo = quantise(images)
        mask = (qi > 0) | (qo > 0)
        x = images.float()
        for ch, q, levels in ((0, qi, INTENSITY_LEVELS), (1, qo, OCCUPANCY_LEVELS)):
            name = "intensity" if ch == 0 else "occupancy"
            e = q.float() / levels - x[:, ch]  # outside the mask q is 0 and |x| < half a level
            err[f"{name}_max"] = max(err[f"{name}_max"], e.abs().max().item())
            err[f"{name}_sq"] += (e[mask].double() ** 2).sum().item()
        err["voxels"] += int(mask.sum())
        for k in range(len(group)):
            w = fit_weights(qi[k], qo[k], mask[k])
            pred = torch.stack([predict(slice_features(qi[k:k + 1], qo[k:k + 1], z), w[None],
                                        (qo[k:k + 1, z] == OCCUPANCY_LEVELS))[0] for z in range(qi.shape[1])])
            m = mask[k].numpy()
            masks.append(np.packbits(m).tobytes())
            occ.append(qo[k].numpy()[m].astype(np.uint8).tobytes())
            res.append(zigzag((qi[k] - pred).numpy()[m]).tobytes())
            nnz.append(int(m.sum()))
            weights.append(w.numpy())
        print(f"pack: {a + len(group)}/{len(sources)} cases ({time.time() - t0:.0f} s)", flush=True)
    streams = {"mask": bz2.compress(b"".join(masks), 9), "occupancy": bz2.compress(b"".join(occ), 9),
               "residual": lzma.compress(b"".join(res), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)}
    streams = {k: np.frombuffer(v, dtype=np.uint8) for k, v in streams.items()}
    meta = {"format": FORMAT, "grid": grid, "window_hu": manifests[0]["window_hu"],
            "channels": manifests[0]["channels"], "cases": cases, "sources": [str(d) for d in datasets],
            "levels": {"intensity": INTENSITY_LEVELS, "occupancy": OCCUPANCY_LEVELS}, "scale_bits": SCALE_BITS,
            "offsets": OFFSETS}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), nnz=np.array(nnz),
                 weights=np.stack(weights), **streams)
    window = float(np.diff(meta["window_hu"])[0])
    v = max(err["voxels"], 1)
    stats = {"cases": len(cases), "bytes": Path(out).stat().st_size,
             "stream_bytes": {k: int(s.size) for k, s in streams.items()},
             "tibia_voxels_per_case": err["voxels"] / len(cases),
             "intensity_error_max": err["intensity_max"], "intensity_error_rms": (err["intensity_sq"] / v) ** 0.5,
             "intensity_error_rms_hu": (err["intensity_sq"] / v) ** 0.5 * window,
             "occupancy_error_max": err["occupancy_max"], "occupancy_error_rms": (err["occupancy_sq"] / v) ** 0.5,
             "seconds": time.time() - t0}
    return stats


def decode(path: str, device: str = "cpu", batch: int = 64, check_on_cpu: int = 2):
    """(meta, images) with images a float16 tensor (N, 2, Z, Y, X) on the CPU. Decoded on ``device``; then,
    if that is not the CPU, the first ``check_on_cpu`` cases again on the CPU, which must agree exactly."""
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        nnz, weights = z["nnz"], torch.from_numpy(z["weights"]).long()
        streams = {"mask": bz2.decompress(z["mask"].tobytes()), "occupancy": bz2.decompress(z["occupancy"].tobytes()),
                   "residual": lzma.decompress(z["residual"].tobytes(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)}
    if meta["format"] != FORMAT or meta["offsets"] != [list(o) for o in OFFSETS] or \
            meta["levels"] != {"intensity": INTENSITY_LEVELS, "occupancy": OCCUPANCY_LEVELS}:
        raise SystemExit(f"unpack: {path} is not a {FORMAT} file made by this version of fine_data.py")
    nx, ny, nz = meta["grid"]["size"]
    shape, vox = (nz, ny, nx), nx * ny * nz
    mbytes = (vox + 7) // 8
    starts = np.concatenate([[0], np.cumsum(nnz)])

    def cases(a: int, b: int, dev: torch.device) -> torch.Tensor:
        qo = torch.zeros(b - a, *shape, dtype=torch.int32)
        res = torch.zeros(b - a, *shape, dtype=torch.int32)
        masks = torch.zeros(b - a, *shape, dtype=torch.bool)
        for k, c in enumerate(range(a, b)):
            m = np.unpackbits(np.frombuffer(streams["mask"], np.uint8, mbytes, c * mbytes), count=vox)
            m = torch.from_numpy(m.astype(bool).reshape(shape))
            sl = slice(int(starts[c]), int(starts[c + 1]))
            masks[k] = m
            qo[k][m] = torch.from_numpy(np.frombuffer(streams["occupancy"][sl], np.uint8).astype(np.int32))
            res[k][m] = torch.from_numpy(unzigzag(np.frombuffer(streams["residual"][sl], np.uint8)).astype(np.int32))
        qo, res, masks, w = qo.to(dev), res.to(dev), masks.to(dev), weights[a:b].to(dev)
        qi = torch.zeros_like(qo)
        for z in range(nz):
            pred = predict(slice_features(qi, qo, z), w, qo[:, z] == OCCUPANCY_LEVELS)
            qi[:, z] = torch.where(masks[:, z], (pred + res[:, z]) % 256, 0).int()
        return torch.stack([(qi.float() / INTENSITY_LEVELS).half().cpu(),
                            (qo.float() / OCCUPANCY_LEVELS).half().cpu()], 1)

    images = torch.empty(len(nnz), 2, *shape, dtype=torch.float16)
    for a in range(0, len(nnz), batch):
        images[a:a + batch] = cases(a, min(a + batch, len(nnz)), torch.device(device))
    k = min(check_on_cpu, len(nnz))
    if torch.device(device).type != "cpu" and k and not torch.equal(cases(0, k, torch.device("cpu")), images[:k]):
        raise SystemExit(f"unpack: the {device} decoding differs from the CPU's; unpack with --device cpu")
    return meta, images


def unpack(path: str, out: str, device: str = "cpu", overwrite: bool = False) -> Path:
    from TibiaReconstructionLib.canonical import write_canonical_dataset
    from TibiaReconstructionLib.geometry import Grid

    t0 = time.time()
    meta, images = decode(path, device)
    folder = write_canonical_dataset(out, Grid.from_dict(meta["grid"]), meta["window_hu"], meta["cases"], images,
                                     channels=meta["channels"],
                                     extra={"packed_by": {"tool": "benchmarks/gpu/fine_data.py", "format": FORMAT,
                                                          "levels": meta["levels"], "sources": meta["sources"]}},
                                     overwrite=overwrite)
    print(f"unpack: {len(meta['cases'])} cases, grid {meta['grid']['size']} at {meta['grid']['spacing'][0]} mm "
          f"-> {folder} ({time.time() - t0:.1f} s)", flush=True)
    return folder


def check(path: str, datasets: list[str], device: str = "cpu") -> dict:
    """Decode ``path`` and compare with the original data sets: largest errors per channel."""
    meta, images = decode(path, device)
    files = [safe_open(str(Path(d) / "tensors.safetensors"), framework="pt") for d in datasets]
    index = [(f, i) for f in files for i in range(f.get_slice("images").get_shape()[0])][:len(meta["cases"])]
    worst = [0.0, 0.0]
    for k, (f, i) in enumerate(index):
        orig = f.get_slice("images")[i:i + 1][0].float()
        for ch, levels in ((0, INTENSITY_LEVELS), (1, OCCUPANCY_LEVELS)):
            worst[ch] = max(worst[ch], (images[k, ch].float() - orig[ch]).abs().max().item())
    return {"cases": len(index), "intensity_error_max": worst[0], "occupancy_error_max": worst[1],
            "bounds": {"intensity": 0.5 / INTENSITY_LEVELS, "occupancy": 0.5 / OCCUPANCY_LEVELS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="canonical data set folders -> one packed file")
    a.add_argument("datasets", nargs="+")
    a.add_argument("--out", required=True)
    a.add_argument("--cases", type=int, help="pack only the first N cases")
    u = sub.add_parser("unpack", help="packed file -> canonical data set folder")
    u.add_argument("pack")
    u.add_argument("--out", required=True)
    u.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    u.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("check", help="decode a packed file and compare it with its source data sets")
    c.add_argument("pack")
    c.add_argument("datasets", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(args.datasets, args.out, args.cases), indent=1))
    elif args.cmd == "unpack":
        unpack(args.pack, args.out, args.device, args.overwrite)
    else:
        print(json.dumps(check(args.pack, args.datasets), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
