import subprocess
import sys

import numpy as np
import pytest

from spineps_like import __version__
from spineps_like.cli import main
from spineps_like.io import load_scan
from spineps_like.snapshot import save_snapshot


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "spineps_like.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for sub in ("phantom", "segment", "evaluate", "info", "labels"):
        assert sub in proc.stdout


def test_info_prints_geometry(sample_mri, capsys):
    assert main(["info", str(sample_mri["image"])]) == 0
    out = capsys.readouterr().out
    assert "orientation PIR" in out and "(68, 52, 67)" in out


def test_labels_command_writes_table(tmp_path):
    assert main(["labels", "--out", str(tmp_path / "spine.ctbl")]) == 0
    text = (tmp_path / "spine.ctbl").read_text()
    assert "49 Vertebra_Corpus_border" in text


def test_snapshot_of_real_crop(tmp_path, sample_mri):
    img = load_scan(sample_mri["image"])
    sem = load_scan(sample_mri["semantic"], kind="mask")
    ins = load_scan(sample_mri["instance"], kind="mask")
    out = save_snapshot(tmp_path / "snp.png", img, sem, ins, title="sample")
    import matplotlib.image as mpimg

    png = mpimg.imread(out)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 300
    # the overlays add colour: a grey-only picture would have R == G == B everywhere
    rgb = png[..., :3]
    assert np.mean(np.abs(rgb[..., 0] - rgb[..., 1]) > 0.05) > 0.02
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
