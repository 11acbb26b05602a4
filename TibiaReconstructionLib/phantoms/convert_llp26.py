"""Convert the tibia-fibula part of the LLP26 shape model into a plain, pickle-free .npz (run once, offline).

    python -m TibiaReconstructionLib.phantoms.convert_llp26 [--out TibiaReconstructionLib/data/llp26_tibia_fibula.npz]

Reads, from the installed ``musculoskeletal-models`` package (MPL-2.0, Auckland Bioengineering
Institute): ``shape_models/LLP26_rigid.pc`` (a pickled dict of numpy arrays; 9675 values = all x,
then all y, then all z of 3225 nodes; the tibia-fibula mesh is nodes 2654..3224) and the cubic
Lagrange topology ``atlas_meshes/tibia_fibula_left_cubic_flat.{ens,mesh}``. Writes (frame: LLP26,
LPS-like for a left leg, x lateral, y posterior, z superior, mm):

- ``mean`` (571, 3), ``modes`` (26, 571, 3) unit-norm over the whole lower limb, ``variances`` (26,)
- ``element_nodes`` (88, 16) global node of each element's local node (-1 padding for 10-node triangles)
- ``element_is_quad`` (88,) True for 4x4-node bicubic quads, False for 10-node cubic triangles
- ``element_bone`` (88,) 0 tibia, 1 fibula (connected parts of the element graph, tibia = larger volume)
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

FIRST_NODE = 2654
N_NODES = 571
N_ALL_NODES = 3225


def _package_dir() -> Path:
    import musculoskeletal.models as mm
    return Path(mm.__file__).parent


def _element_nodes(mesh: dict) -> tuple[np.ndarray, np.ndarray]:
    """Global node numbers per element, numbered as gias3's mapper does (sorted element points, first seen)."""
    conn = {tuple(int(v) for v in key.split("_")): [tuple(int(v) for v in s.split("_")) for s in val.split()]
            for key, val in mesh["connectivity"].items()}
    n_elem = int(mesh["element_counter"])
    is_quad = np.array([mesh["elements"][str(e)].split()[1] == "quad44" for e in range(n_elem)])
    nodes = -np.ones((n_elem, 16), dtype=np.int32)
    number = 0
    for e, p in sorted(conn):
        if nodes[e, p] >= 0:
            continue
        nodes[e, p] = number
        for ec, pc in conn[(e, p)]:
            nodes[ec, pc] = number
        number += 1
    if number != N_NODES:
        raise RuntimeError(f"Mesh numbering gave {number} nodes, expected {N_NODES}.")
    return nodes, is_quad


def _components(nodes: np.ndarray) -> np.ndarray:
    """Connected component (by shared nodes) of each element."""
    parent = list(range(len(nodes)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[int, int] = {}
    for e, row in enumerate(nodes):
        for n in row[row >= 0]:
            if n in owner:
                parent[find(e)] = find(owner[n])
            else:
                owner[n] = e
    roots = [find(e) for e in range(len(nodes))]
    uniq = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return np.array([uniq[r] for r in roots])


def convert(out: Path) -> None:
    base = _package_dir()
    with open(base / "shape_models" / "LLP26_rigid.pc", "rb") as f:
        pc = pickle.load(f)  # the package's own file, offline only
    sel = np.concatenate([np.arange(FIRST_NODE, N_ALL_NODES) + b * N_ALL_NODES for b in range(3)])
    mean = pc["mean"][sel].reshape(3, N_NODES).T
    modes = pc["modes"][sel].T.reshape(-1, 3, N_NODES).transpose(0, 2, 1)
    geof = json.loads((base / "atlas_meshes" / "tibia_fibula_cubic_left_mean_rigid_LLP26.geof").read_text(encoding="utf-8"))
    params = geof["field_parameters"]
    geof_mean = np.array([[float(params[f"node {n:08d}"][f"dim {d}"]) for d in range(3)] for n in range(N_NODES)])
    if np.max(np.abs(geof_mean - mean)) > 1e-3:
        raise RuntimeError("The shape model's tibia-fibula nodes do not match the atlas mesh.")
    mesh = json.loads((base / "atlas_meshes" / "tibia_fibula_left_cubic_flat.mesh").read_text(encoding="utf-8"))
    nodes, is_quad = _element_nodes(mesh)
    ens = json.loads((base / "atlas_meshes" / "tibia_fibula_left_cubic_flat.ens").read_text(encoding="utf-8"))
    if ens["basis"] != {"quad44": "quad_L3_L3", "tri10": "simplex_L3_L3"}:
        raise RuntimeError(f"Unexpected element bases {ens['basis']}; only cubic Lagrange is supported.")
    custom = np.array([ens["custom_map"][str(n)] for n in range(N_NODES)])
    nodes = np.where(nodes >= 0, custom[np.maximum(nodes, 0)], -1)  # gias3's own number -> file node number
    comp = _components(nodes)
    if comp.max() != 1:
        raise RuntimeError(f"Expected two connected bones, found {comp.max() + 1}.")
    # the tibia is the part with more mesh nodes (the fibula is the slimmer bone)
    counts = [len(np.unique(nodes[comp == c][nodes[comp == c] >= 0])) for c in (0, 1)]
    bone = comp if counts[0] > counts[1] else 1 - comp
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, mean=mean, modes=modes.astype(np.float32), variances=pc["weights"],
                        element_nodes=nodes, element_is_quad=is_quad, element_bone=bone.astype(np.int8),
                        source=np.array("musculoskeletal-models 0.2.4, LLP26_rigid.pc (MPL-2.0)"))
    print(f"wrote {out}: {N_NODES} nodes, {len(nodes)} elements, {len(pc['weights'])} modes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" /
                        "llp26_tibia_fibula.npz")
    convert(parser.parse_args().out)


if __name__ == "__main__":
    main()
