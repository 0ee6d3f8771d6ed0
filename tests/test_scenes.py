"""Generated scenes: deterministic by seed, with a real subpart ⊂ part ⊂ whole hierarchy."""
import numpy as np

from trimask.training.scenes import generate_scene


def test_scene_is_deterministic_by_seed():
    a, b, c = generate_scene(11), generate_scene(11), generate_scene(12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.part_map, b.part_map)
    assert not np.array_equal(a.image, c.image)


def test_levels_nest_subpart_in_part_in_whole():
    found_strict = 0
    for seed in range(6):
        s = generate_scene(seed)
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        # Every labelled pixel of a level is labelled at the level above, by its parent.
        sub = s.subpart_map > 0
        assert np.all(s.part_map[sub] > 0)
        assert np.array_equal(s.subpart_parent[s.subpart_map[sub]], s.part_map[sub])
        part = s.part_map > 0
        assert np.array_equal(part, s.whole_map > 0)
        assert np.array_equal(s.part_parent[s.part_map[part]], s.whole_map[part])
        for sid in s.subpart_ids():
            y, x = np.argwhere(s.subpart_map == sid)[0]
            m_sub, m_part, m_whole = s.masks_at(int(y), int(x))
            assert np.all(m_part[m_sub]) and np.all(m_whole[m_part])
            found_strict += int(m_sub.sum() < m_part.sum() < m_whole.sum())
    assert found_strict > 5  # the generator really produces three distinct levels


def test_background_has_no_masks():
    s = generate_scene(3)
    ys, xs = np.nonzero(s.whole_map == 0)
    assert s.masks_at(int(ys[0]), int(xs[0])) is None


def test_a_quarter_of_the_scenes_are_flat_drawings():
    """Flat scenes: one background colour, flat objects (some of a single part), no noise."""
    flat = single_part = 0
    for seed in range(40):
        s = generate_scene(seed)
        background = s.image[s.whole_map == 0]
        if len(np.unique(background, axis=0)) == 1:
            flat += 1
            parts_per_whole = [len(np.unique(s.part_map[s.whole_map == w])) for w in np.unique(s.whole_map) if w]
            single_part += int(1 in parts_per_whole)
            for pid in np.unique(s.part_map):
                unlabelled = (s.part_map == pid) & (s.subpart_map == 0)
                if pid and unlabelled.sum() > 100:  # a part outside its subparts is one colour
                    _, counts = np.unique(s.image[unlabelled], axis=0, return_counts=True)
                    assert counts.max() > 0.9 * unlabelled.sum()  # (blobs pruned as too small keep theirs)
    assert 4 <= flat <= 18
    assert single_part >= 1


def test_varied_aspect_crops_some_scenes_and_keeps_their_maps_aligned():
    shapes = set()
    for seed in range(20):
        s = generate_scene(seed, varied_aspect=True)
        h, w = s.image.shape[:2]
        shapes.add((h, w))
        assert s.whole_map.shape == s.part_map.shape == s.subpart_map.shape == (h, w)
        assert max(h, w) == 256 and min(h, w) >= 128
        full = generate_scene(seed)  # the same scene, uncropped
        assert np.array_equal(full.image[:h, :w], s.image) or (h, w) == (256, 256)
    assert (256, 256) in shapes and len(shapes) > 3


def test_shapes_and_textures_computed_in_a_window_equal_the_whole_grid():
    """The generator computes each shape and texture only in the window that can hold it; with the same
    random draws, the result is the one the whole grid gives, at the edges of the image too."""
    from trimask.training.scenes import _shape_in, _shape_mask, _texture

    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    rng = np.random.default_rng(0)
    kinds_seen = set()
    for trial in range(120):
        cy, cx = rng.uniform(-10, 266, 2)
        r = float(rng.uniform(3.5, 82))
        kinds_seen.add(int(np.random.default_rng(trial).integers(3)))
        windowed = _shape_mask(np.random.default_rng(trial), yy, xx, cy, cx, r)
        whole = _shape_in(np.random.default_rng(trial), yy, xx, cy, cx, r)
        assert whole.any() or not (0 <= cy < 256 and 0 <= cx < 256)
        np.testing.assert_array_equal(windowed, whole)
    assert kinds_seen == {0, 1, 2}
    base = np.array([100.0, 50.0, 200.0], np.float32)
    for trial in range(16):
        win = (slice(trial * 7, trial * 7 + 60), slice(200 - trial * 5, 256))
        part = _texture(np.random.default_rng(trial), yy, xx, base, 20.0, win)
        np.testing.assert_array_equal(part, _texture(np.random.default_rng(trial), yy, xx, base, 20.0)[win])
