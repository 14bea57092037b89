import numpy as np
import pytest

from spineps_like import labels as L


def test_instance_ids_follow_tptbox():
    assert [L.VERTEBRA_NAME_TO_ID[f"C{i}"] for i in range(1, 8)] == list(range(1, 8))
    assert [L.VERTEBRA_NAME_TO_ID[f"T{i}"] for i in range(1, 13)] == list(range(8, 20))
    assert L.VERTEBRA_NAME_TO_ID["T13"] == 28
    assert [L.VERTEBRA_NAME_TO_ID[f"L{i}"] for i in range(1, 7)] == list(range(20, 26))
    assert L.VERTEBRA_NAME_TO_ID["S1"] == L.SACRUM_ID == 26


def test_tptbox_agrees_with_our_ids():
    from TPTBox.core.vert_constants import v_idx2name

    for i, name in L.VERTEBRA_ID_TO_NAME.items():
        assert v_idx2name[i] == name


def test_instance_name_round_trip():
    for i in L.all_instance_ids():
        assert L.instance_id(L.instance_name(i)) == i
    assert L.instance_name(120) == "IVD L1" and L.instance_name(228) == "Endplate T13"
    with pytest.raises(ValueError):
        L.instance_name(99)


def test_anatomical_order_places_transitional_vertebrae():
    order = L.ANATOMICAL_ORDER
    assert order.index(28) == order.index(19) + 1 == order.index(20) - 1  # T12 < T13 < L1
    assert order.index(25) + 1 == order.index(26)  # L6 directly above the sacrum
    assert L.next_vertebra(19) == 20 and L.next_vertebra(19, include_transitional=True) == 28
    assert L.next_vertebra(24) == 26


def test_semantic_scheme_matches_tptbox_locations():
    from TPTBox.core.vert_constants import Location

    for lab in L.Semantic:
        if lab != L.Semantic.SACRUM:
            assert Location(int(lab)).value == int(lab)


def test_check_semantic_rejects_foreign_labels():
    m = np.zeros((4, 4, 4), np.int16)
    m[0, 0, 0] = 49
    L.check_semantic(m)
    m[1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        L.check_semantic(m)


@pytest.mark.parametrize("kind", ["semantic", "instance"])
@pytest.mark.parametrize("suffix", [".txt", ".ctbl"])
def test_colour_table_round_trip(tmp_path, kind, suffix):
    path = L.export_colour_table(tmp_path / f"lut{suffix}", kind=kind)
    back = L.parse_colour_table(path)
    rows = L.colour_table(kind)
    assert sorted(back) == [r[0] for r in rows]
    for idx, name, rgb in rows:
        assert back[idx][1] == rgb
        assert back[idx][0] == name
    # distinct colours per semantic label so structures can be told apart in a viewer
    if kind == "semantic":
        assert len({rgb for _, _, rgb in rows}) == len(rows)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_label_mask_equals_isin(dtype):
    """The 8-bit table look-up and the np.isin fallback answer exactly what np.isin does (labels past 255 included)."""
    rng = np.random.default_rng(3)
    top = 256 if dtype == np.uint8 else 400
    mask = rng.integers(0, top, (17, 9, 5)).astype(dtype)
    for labels in [(49, 52, 53), (60, 61), (45, 46, 47, 48), (0, 1, 2), (250, 255), (255,), (100, 300), (0,), ()]:
        got = L.label_mask(mask, labels)
        assert got.dtype == bool and got.shape == mask.shape
        assert np.array_equal(got, np.isin(mask, labels)), labels


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.uint32, np.int32, np.int64])
def test_label_counts_equals_bincount(dtype):
    """Counts per value as np.bincount gives them, for masks with gaps, a large top value, minlength and no voxels."""
    rng = np.random.default_rng(5)
    top = 2 if dtype is bool else 300 if dtype != np.uint8 else 256
    mask = rng.integers(0, top, (13, 11, 7)).astype(dtype)
    mask[mask % 7 == 3] = 0  # values that never occur
    for minlength in (0, 5, 1000):
        got = L.label_counts(mask, minlength)
        want = np.bincount(mask.ravel().astype(np.int64), minlength=minlength)
        assert got.dtype == np.int64 and np.array_equal(got, want), minlength
    assert np.array_equal(L.label_counts(np.zeros((3, 3, 3), dtype)), [27])
    assert np.array_equal(L.label_counts(np.zeros((0, 3), dtype), 4), np.zeros(4, np.int64))
    if np.issubdtype(dtype, np.signedinteger):
        with pytest.raises(ValueError, match="negative"):
            L.label_counts(np.array([[[0, -1]]], dtype))
