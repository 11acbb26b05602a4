"""Stand-in for a vtk submodule on the GPU training machine (see vtk/__init__.py)."""

from SimpleITK import Missing


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"{__name__}.{name}")
