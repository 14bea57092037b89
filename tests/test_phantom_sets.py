"""The test split is enforced by code: named phantom sets, and every training entry point refuses their seeds."""

from __future__ import annotations

import numpy as np
import pytest

from spineps_like.phantom_sets import (
    DEVELOPMENT, EVALUATION_SEEDS, SETS, TEST, check_training_seed, check_training_seeds, evaluation_set_of,
    phantom_set,
)


def test_sets_are_named_disjoint_and_cover_the_benchmark_seeds():
    assert set(SETS) == {"development", "test"}
    assert phantom_set("development") is DEVELOPMENT and phantom_set("test") is TEST
    with pytest.raises(ValueError, match="unknown phantom set"):
        phantom_set("validation")
    assert not set(DEVELOPMENT.seeds) & set(TEST.seeds)
    assert DEVELOPMENT.seed(0) == 900_000 and TEST.seed(3) == 2_000_003
    with pytest.raises(IndexError):
        TEST.seed(len(TEST.seeds))
    for seed in (900_000, 999_999, 2_000_000, 2_099_999, np.int64(900_001)):
        assert seed in EVALUATION_SEEDS
    for seed in (0, 27, 899_999, 1_000_000, 1_999_999, 2_100_000, "900000", 900_000.0):
        assert seed not in EVALUATION_SEEDS
    assert evaluation_set_of(2_000_005) is TEST and evaluation_set_of(5) is None
    assert len(EVALUATION_SEEDS) == len(DEVELOPMENT.seeds) + len(TEST.seeds)


def test_check_training_seed_names_the_set():
    assert check_training_seed(899_999) == 899_999
    assert check_training_seeds(range(3)) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"900003 belongs to the development set \(seeds 900000-999999"):
        check_training_seed(900_003)
    with pytest.raises(ValueError, match=r"2000000 \(and 1 more evaluation seeds\) belongs to the test set"):
        check_training_seeds([1, 2_000_000, 2_000_001])


# ---------------------------------------------------------------- instance training (seed * 100000 + i)
@pytest.mark.parametrize("seed, phantoms, what", [(9, 24, "development"), (20, 24, "test"), (9, 0, "development")])
def test_instance_training_refuses_evaluation_phantoms_before_any_work(tmp_path, seed, phantoms, what):
    from spineps_like.training.instance import TrainConfig, phantom_seeds, train

    cfg = TrainConfig(out=str(tmp_path / "model"), seed=seed, phantoms=phantoms, val_phantoms=4, steps=1)
    with pytest.raises(ValueError, match=f"--seed {seed}: phantom seed .* {what} set"):
        phantom_seeds(cfg)

    def never(*_a):
        raise AssertionError("a phantom was drawn")

    with pytest.raises(ValueError, match=f"{what} set"):
        train(cfg, make_volume=never, log=lambda m: None)
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.train").exists()


def test_instance_training_command_line_refuses_evaluation_seeds(tmp_path, capsys):
    from spineps_like.cli import main as cli_main
    from spineps_like.training.instance import main

    assert main(["--out", str(tmp_path / "m"), "--seed", "9", "--steps", "1"]) == 1
    assert "development set" in capsys.readouterr().err
    assert cli_main(["train", "instance", "--out", str(tmp_path / "m"), "--seed", "20", "--steps", "1"]) == 1
    assert "test set" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_instance_training_seeds_of_the_bundled_model_stay_allowed():
    from spineps_like.training.instance import TrainConfig, phantom_seeds

    assert phantom_seeds(TrainConfig(out="x", seed=0)) == list(range(28))  # models/instance-phantom: seeds 0-27
    with pytest.raises(ValueError, match="at most 100000 phantoms"):
        phantom_seeds(TrainConfig(out="x", seed=1, phantoms=100_000, val_phantoms=1))
    with pytest.raises(ValueError, match="must be >= 0"):
        phantom_seeds(TrainConfig(out="x", seed=-1))


# ---------------------------------------------------------------- semantic training (seeds drawn from [0, 2^31))
def test_semantic_training_holds_out_every_evaluation_set():
    from spineps_like.training import semantic

    assert semantic.HELD_OUT_SEEDS is EVALUATION_SEEDS


def test_semantic_phantom_draw_skips_evaluation_seeds(monkeypatch):
    """Force the draw onto a development and a test seed: both are skipped, the next seed is taken."""
    from spineps_like.training import semantic

    class Rng:
        def __init__(self, *_a):
            self.seeds = iter([900_005, 2_000_003, 17])

        def random(self):
            return 0.99  # 'random' mode, no variant

        def integers(self, *_a):
            return next(self.seeds)

    monkeypatch.setattr(semantic.np.random, "default_rng", Rng)
    (spec,) = semantic.case_specs(1, 9)
    assert spec.seed == 17


def test_semantic_draw_of_the_bundled_seed_holds_no_evaluation_phantom():
    from spineps_like.training.semantic import case_specs

    seeds = [s.seed for s in case_specs(300, 0)]
    assert not [s for s in seeds if s in EVALUATION_SEEDS]


def test_semantic_run_training_refuses_evaluation_specs(tmp_path):
    """Specs handed to the Python API are checked too, before any data is written."""
    from spineps_like.training.semantic import CaseSpec, SemanticTrainingRun, run_training

    run = SemanticTrainingRun(out=str(tmp_path / "m"), n_train=1, seed=0, iterations=1, work=str(tmp_path / "w"))
    specs = [CaseSpec("phantom_0000", 900_003, "lumbar", "t2w", None)]
    with pytest.raises(ValueError, match="development set"):
        run_training(run, specs=specs)
    assert not (tmp_path / "w" / "nnUNet_raw").exists() or not any((tmp_path / "w" / "nnUNet_raw").rglob("*.nii.gz"))
