"""Stand-in for SimpleITK on the GPU training machine, which has none (see benchmarks/gpu/README.md).

Importing it works and any attribute is a placeholder, so modules that import SimpleITK at module
level (geometry.py, io.py) load; calling anything raises. Training and bundle export never call it.
"""


class Missing:
    """A placeholder for ``name``: attributes are placeholders too; calling it raises ModuleNotFoundError."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        package = self._name.split(".")[0]
        raise ModuleNotFoundError(f"{self._name} was called, but {package} is only a stand-in on this machine "
                                  f"(benchmarks/gpu/stubs, for GPU training); run this where {package} is installed.")

    def __repr__(self) -> str:
        return f"<stand-in {self._name}>"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"{__name__}.{name}")
