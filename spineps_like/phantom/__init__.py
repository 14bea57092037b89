"""Synthetic spine phantoms (sagittal MRI/CT look-alikes) with exact ground truth in the SPINEPS label scheme.

A phantom is built in stages, each a module of this package and each deterministic by seed (independent random streams for anatomy, field of view,
body habitus, intensities, noise and orientation, so that changing e.g. the orientation leaves the anatomy untouched):

1. **Layout** (:mod:`.anatomy`): a chain of vertebrae C2..L5 (+ T13/L6 variants) and a five-segment sacrum along a
   curved line (cervical lordosis, thoracic kyphosis, lumbar lordosis, sacral kyphosis, optional mild scoliosis).
   Each vertebra is a rigid local frame (x posterior, y inferior/along the spine, z right) with adult dimensions
   that grow from C to L; discs take the curvature as wedges between the corpora.
2. **Rasterisation** (:mod:`.anatomy`) on a fine grid (each output voxel is split into sub-voxels of at most 1.4 mm):
   every part is evaluated only inside its own bounding box (analytic implicit shapes: corpus with concave endplate
   surfaces, arcus ring around the canal, capsules for processes) and painted into three uint8 volumes: semantic
   label, instance id and an internal appearance class (marrow, cortex, endplate, nucleus, annulus, CSF, cord,
   ligament, ribs, ilium, ...).
3. **Rendering** (:mod:`.body`, :mod:`.render`) on the output grid: the appearance classes are mapped to intensities and area-averaged over the
   sub-voxels (real partial volume); the body around the spine (fat, muscle, viscera with bowel gas, vessels, lungs,
   airway, bladder) is composited analytically with soft edges; then texture, bias field (MRI), blur and noise
   (Rician for MRI, Gaussian for CT). Masks take the label of the sub-voxel at each output voxel's centre, so a
   1-2 mm endplate survives a 3-4 mm left-right spacing.

Every phantom also carries its **tissue map** (:attr:`Phantom.tissue`, labels :data:`TISSUES`): the label map from
which :mod:`.appearance` paints images of any contrast, SynthSeg-style (T1w, T2w, STIR, PD, CT, random), anew for
every training sample. :mod:`.generate` holds :func:`make_phantom` and :func:`write_phantoms`; :mod:`.calibration`
compares phantoms with the real TPTBox crops.

Intensity means of ``mode='t2w'`` and ``mode='ct'`` are calibrated against the two real TPTBox sample crops
(see :func:`calibration_table` and docs/phantom_calibration.md); ``mode='random'`` draws every class intensity,
bias, noise, blur and gamma at random (domain randomisation), so that models learn shape.

Example
-------
>>> ph = make_phantom(3, fov="lumbar", mode="t2w", spacing=(1.0, 1.0, 3.3), orientation="PIR")
>>> ph.semantic.array.shape == ph.image.array.shape
True
"""


from spineps_like.phantom.anatomy import TISSUE_ID, TISSUES
from spineps_like.phantom.calibration import (
    CALIBRATION_LEVELS,
    STAT_GROUPS,
    calibration_figure,
    calibration_markdown,
    calibration_table,
    label_intensity_stats,
    tptbox_reference_stats,
    tptbox_sample,
)
from spineps_like.phantom.generate import (
    FINE_MAX_MM,
    FOVS,
    GENERATOR_VERSION,
    MODES,
    VARIANTS,
    Phantom,
    make_phantom,
    visible_variants,
    write_phantoms,
)

__all__ = [
    "CALIBRATION_LEVELS", "FINE_MAX_MM", "FOVS", "GENERATOR_VERSION", "MODES", "STAT_GROUPS", "TISSUES", "TISSUE_ID",
    "VARIANTS", "Phantom", "calibration_figure", "calibration_markdown", "calibration_table", "label_intensity_stats",
    "make_phantom", "tptbox_reference_stats", "tptbox_sample", "visible_variants", "write_phantoms",
]
