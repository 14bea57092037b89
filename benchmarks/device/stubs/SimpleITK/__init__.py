"""Stand-in for SimpleITK on a lent GPU machine (benchmarks/device/README.md), where its ~50 MB wheel does not fit the
64 MiB that travels. nnunetv2 imports SimpleITK at module level but calls it only to read and write files, which the
GPU check never does; spineps-like calls it only for MHA input and N4. Any use raises, naming this stand-in.
gpu_check.py puts this folder on the path only when the real SimpleITK cannot be imported."""

STUB = True


class SimpleITKNotCarried(AttributeError):
    """Raised by any attribute of the stand-in (an AttributeError: hasattr() answers False, and ``from SimpleITK
    import X`` raises ImportError)."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise SimpleITKNotCarried(f"SimpleITK.{name}: SimpleITK was not carried to this machine (a stand-in from "
                              "benchmarks/device/stubs); MHA input and N4 need the real package")
