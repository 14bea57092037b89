"""spineps-like: semantic and instance segmentation of the spine in MRI and CT, in the style of SPINEPS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spineps-like")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
