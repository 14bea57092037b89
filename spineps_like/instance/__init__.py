"""Instance phase: cutouts around corpus centres, the SPINEPS instance U-Net, inter-Dice fusion."""

from spineps_like.instance.cutouts import (
    ABOVE, BELOW, CENTRE, SPINEPS_INPUT_MAPPING, Cutouts, SparseMask, SparsePrediction, cutout_targets,
    extract_cutouts, map_input,
)
from spineps_like.instance.fusion import FusionGroup, FusionResult, fuse_predictions

__all__ = [
    "ABOVE", "BELOW", "CENTRE", "SPINEPS_INPUT_MAPPING", "Cutouts", "SparseMask", "SparsePrediction",
    "cutout_targets", "extract_cutouts", "map_input", "FusionGroup", "FusionResult", "fuse_predictions",
    "InstanceModel", "Unet3D", "load_instance_model", "predict_cutouts",
]


def __getattr__(name: str):  # the network needs torch: import it only when asked for
    if name in ("InstanceModel", "Unet3D", "load_instance_model", "predict_cutouts"):
        from spineps_like.instance import network

        return getattr(network, name)
    raise AttributeError(f"module 'spineps_like.instance' has no attribute {name!r}")
