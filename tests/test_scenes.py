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
