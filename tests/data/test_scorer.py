import io

import numpy as np
from PIL import Image

from nextstep_jax.data.scorer import detect, evaluate, score
from nextstep_jax.data.shapes import CATEGORIES, ShapesConfig, generate


def _samples(size, n, split="train"):
    return [generate(ShapesConfig(size=size, split=split), i) for i in range(n)]


def test_ground_truth_scores_one_per_category_and_split():
    for size in (32, 64):
        for split in ("train", "novel"):
            samples = _samples(size, 100, split)
            result = evaluate([s.image for s in samples], [s.caption for s in samples])
            assert set(result) == set(CATEGORIES) | {"overall"}
            assert result == {k: 1.0 for k in result}, (size, split, result)


def test_detections_match_the_layout():
    for s in _samples(64, 30):
        found = sorted((d.color, d.shape, d.center) for d in detect(s.image))
        expected = sorted((o.color, o.shape, o.center) for o in s.objects)
        assert [f[:2] for f in found] == [e[:2] for e in expected]
        for f, e in zip(found, expected):
            assert abs(f[2][0] - e[2][0]) <= 0.5 and abs(f[2][1] - e[2][1]) <= 0.5


def test_mismatched_captions_score_zero():
    samples = _samples(64, 120)
    hits = []
    for i, s in enumerate(samples):
        pairs = set(s.claim.objects)
        other = next(o for o in samples[i + 1:] + samples[:i] if not pairs & set(o.claim.objects))
        hits.append(score(s.image, other.caption))
    assert sum(hits) == 0
    shuffled = [samples[(i + 1) % len(samples)].caption for i in range(len(samples))]
    assert evaluate([s.image for s in samples], shuffled)["overall"] < 0.15


def test_robust_to_mild_noise_and_jpeg():
    rng = np.random.default_rng(0)
    samples = _samples(64, 60)
    degraded = []
    for s in samples:
        noisy = np.clip(s.image.astype(int) + rng.normal(0, 6, s.image.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=85)
        degraded.append(np.asarray(Image.open(buf)))
    assert evaluate(degraded, [s.caption for s in samples])["overall"] >= 0.95


def test_blank_and_wrong_counts_fail():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert not score(blank, "a red circle")
    s = next(s for s in _samples(64, 200) if s.claim.category == "counting" and s.claim.count == 3)
    color, shape = s.claim.objects[0]
    assert score(s.image, f"three {color} {shape}s") and not score(s.image, f"two {color} {shape}s")
