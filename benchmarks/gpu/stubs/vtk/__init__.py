"""Stand-in for vtk on the GPU training machine, which has none (see benchmarks/gpu/README.md): importing
works, calling anything raises (see the SimpleITK stand-in). Training and bundle export never call VTK."""

from SimpleITK import Missing


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"{__name__}.{name}")
