"""The module's .ui file and its parameter node agree (read as text: the GUI needs the Slicer desktop app)."""

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE = Path(__file__).resolve().parent.parent / "TibiaReconstruction"


def parameter_names() -> set[str]:
    tree = ast.parse((MODULE / "TibiaReconstruction.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TibiaReconstructionParameterNode")
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}


def test_every_widget_bound_to_a_parameter_names_one_of_the_parameter_node():
    root = ET.parse(MODULE / "Resources" / "UI" / "TibiaReconstruction.ui").getroot()
    bound = {p.find("string").text: w.get("name") for w in root.iter("widget") for p in w.findall("property")
             if p.get("name") == "SlicerParameterName"}
    assert {"reduceFragments", "keepVisibleBone", "reassembleFragments", "useOtherLeg", "device"} <= set(bound)
    assert set(bound) <= parameter_names(), {k: v for k, v in bound.items() if k not in parameter_names()}
