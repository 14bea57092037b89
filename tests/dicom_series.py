"""Write DICOM series for the tests with pydicom (classic MR/CT images with realistic tags), highdicom (a legacy
converted enhanced multi-frame file) and SimpleITK (GDCM): a :class:`~spineps_like.io.Scan` goes in, files come out,
and the (array, affine) the series holds, after the stored values' quantisation, comes back."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(v: float) -> DSfloat:
    return DSfloat(float(v), auto_format=True)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """4 x 4 rotation about the world axis 'x', 'y' or 'z'."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def quantise(array: np.ndarray, modality: str, slope: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """(stored integers, the values they stand for) of ``array`` under RescaleSlope/Intercept."""
    stored = np.round((array.astype(np.float64) - intercept) / slope)
    if modality == "CT":
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
    else:
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
    return stored, (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def write_series(folder: str | Path, array: np.ndarray, affine: np.ndarray, *, modality: str = "MR",
                 slope: float = 1.0, intercept: float = 0.0, slope_per_slice: Sequence[float] | None = None,
                 order: str = "ascending", seed: int = 0, series_number: int = 3, description: str = "T2 TSE SAG",
                 study_uid: str | None = None, series_uid: str | None = None, frame_uid: str | None = None,
                 positions: np.ndarray | None = None, orientations: Sequence[np.ndarray] | None = None,
                 skip: Sequence[int] = (), prefix: str = "IM") -> tuple[list[Path], np.ndarray, list[Dataset]]:
    """Write ``array`` (axes: column, row, slice) with RAS ``affine`` as one classic DICOM series in ``folder``.

    Slice k goes to a file whose name and InstanceNumber follow ``order`` ('ascending', 'descending' or 'shuffled'
    file order against k), so neither says where the slice is. ``positions`` / ``orientations`` override the
    ImagePositionPatient (LPS) / ImageOrientationPatient of each slice (tilted or broken stacks); ``skip`` leaves
    slices out. Returns (files, the float32 values the series holds, datasets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ np.asarray(affine, float)
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    n = array.shape[2]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    rng = np.random.default_rng(seed)
    slots = {"ascending": list(range(n)), "descending": list(range(n))[::-1],
             "shuffled": [int(i) for i in rng.permutation(n)]}[order]
    values = np.empty(array.shape, np.float32)
    files, datasets = [], []
    normal = np.cross(row, col)
    for slot, k in enumerate(slots):
        s = float(slope_per_slice[k]) if slope_per_slice is not None else slope
        stored, values[:, :, k] = quantise(array[:, :, k], modality, s, intercept)
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "M", "NONE"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Spine", "PH0001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC0001", ""
        ds.Modality, ds.Manufacturer, ds.InstitutionName = modality, "Phantom Imaging", "spineps-like tests"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, slot + 1
        ds.AcquisitionNumber = 1
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ipp = lps[:3, 3] + k * lps[:3, 2] if positions is None else np.asarray(positions[k], float)
        iop = np.concatenate([row, col]) if orientations is None else np.asarray(orientations[k], float)
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.SliceLocation = _ds(float(ipp @ normal))
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing (between rows), column spacing
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        if modality == "MR":
            ds.SpacingBetweenSlices = _ds(np.linalg.norm(lps[:3, 2]))
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "2D", 100, 3500, 16
            ds.MagneticFieldStrength, ds.ImagingFrequency = 1.5, 63.9
        else:
            ds.KVP, ds.ConvolutionKernel, ds.RescaleType = 120, "B30f", "HU"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if modality == "CT" else 0
        ds.RescaleSlope, ds.RescaleIntercept = _ds(s), _ds(intercept)
        ds.WindowCenter, ds.WindowWidth = _ds(float(array.mean())), _ds(max(1.0, float(np.ptp(array))))
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()
        path = folder / f"{prefix}{slot + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        datasets.append(ds)
    return files, values, datasets


def write_enhanced(path: str | Path, datasets: Sequence[Dataset]) -> Path:
    """One legacy converted enhanced multi-frame MR/CT file (highdicom) from a classic series' datasets."""
    import highdicom as hd

    cls = hd.legacy.LegacyConvertedEnhancedCTImage if datasets[0].Modality == "CT" else \
        hd.legacy.LegacyConvertedEnhancedMRImage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'cannot determine WindowWidth in FrameVOILUTSequence'
        mf = cls(list(datasets), series_instance_uid=generate_uid(), series_number=int(datasets[0].SeriesNumber) + 100,
                 sop_instance_uid=generate_uid(), instance_number=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_sitk_series(folder: str | Path, array: np.ndarray, affine: np.ndarray, *, modality: str = "CT",
                      intercept: float = -1024.0) -> tuple[list[Path], np.ndarray]:
    """The same kind of series written by SimpleITK's GDCM ImageIO (int16 stored values, RescaleIntercept).

    GDCM's writer switches the process to the C locale and leaves it there (Python's default text encoding becomes
    ASCII for every later test): the locale is put back afterwards."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    try:
        return _write_sitk_series(folder, array, affine, modality=modality, intercept=intercept)
    finally:
        locale.setlocale(locale.LC_ALL, before)


def _write_sitk_series(folder: str | Path, array: np.ndarray, affine: np.ndarray, *, modality: str,
                       intercept: float) -> tuple[list[Path], np.ndarray]:
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, values = quantise(array, "CT", 1.0, intercept)
    lps = LPS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    # GDCM takes the modality values (HU) and stores them with the RescaleIntercept given in the tags
    img = sitk.GetImageFromArray(np.ascontiguousarray(values.astype(np.int16).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    direction = img.GetDirection()
    files = []
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {"0008|0060": modality, "0008|0016": CTImageStorage, "0020|000d": study, "0020|000e": series,
                "0020|0052": frame, "0008|0018": generate_uid(), "0020|0011": "7", "0008|103e": "CT sitk",
                "0010|0010": "Phantom^Sitk", "0010|0020": "PH0002", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))),
                "0020|0037": "\\".join(map(str, (direction[0], direction[3], direction[6],
                                                 direction[1], direction[4], direction[7]))),
                "0018|0050": str(spacing[2]), "0028|1052": str(intercept), "0028|1053": "1", "0028|1054": "HU"}
        for key, v in tags.items():
            sl.SetMetaData(key, v)
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files, values


def header(path: str | Path) -> Dataset:
    return pydicom.dcmread(str(path), stop_before_pixels=True)
