"""The latency model: recency-weighted least squares, persistence, offline calibration."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models_tiny import tiny_model
from propd_compile.cost_model import FEATURES, LatencyModel, calibrate, features
from propd_compile.decoding import eager_forward


def synthetic(coef, shapes, noise, rng):
    return [(features(b, t, t, kv), sum(c * x for c, x in zip(coef, features(b, t, t, kv))) * (1 + rng.uniform(-noise, noise)))
            for b, t, kv in shapes]


SHAPES = [(b, t, kv) for b in (1, 2, 4, 8) for t in (1, 2, 4, 8, 16, 32, 64) for kv in (64, 256, 512)]


@settings(deadline=None, max_examples=30)
@given(
    base=st.floats(0.005, 0.1), tree=st.floats(0.0, 0.05), per_token=st.floats(1e-5, 2e-3), per_kv=st.floats(0.0, 1e-4),
    seed=st.integers(0, 10**6),
)
def test_fit_recovers_a_linear_latency_law(base, tree, per_token, per_kv, seed):
    """Steps whose time follows the feature model (+-3% noise) are predicted within ~5% on unseen
    shapes. The training shapes include the one-token regime (B = T = 1): no regression can
    learn the cost of a regime it never saw, which is why `calibrate`'s grid always has T = 1."""
    rng = random.Random(seed)
    coef = [base, tree, 0.0, 0.0, per_token, 0.0, per_kv, 0.0]
    one_token = [s for s in SHAPES if s[0] * s[1] == 1]
    shapes = [s for s in SHAPES if s[0] * s[1] > 1]
    rng.shuffle(shapes)
    model = LatencyModel(half_life=float("inf"))
    for x, t in synthetic(coef, one_token + shapes[:57], 0.03, rng):
        model.observe(x, t)
    model.fit()
    assert model.mape(synthetic(coef, shapes[57:], 0.0, rng)) < 0.06  # noise +-3% on 60 points: a little more held out


def test_the_per_token_slope_may_change_with_the_token_count():
    """Steps whose first rows are nearly free and whose later rows cost their arithmetic (the
    block-format GEMMs at batch 1: +0.6 ms a row up to 4 tokens, +2 ms past them) are predicted
    within 6% at every tree size at batch 1; one slope over all sizes is off by 22% there."""
    def seconds(b, t, kv):
        n = b * t
        return 0.010 + 0.0006 * min(n, 4) + 0.002 * max(n - 4, 0) + 1e-6 * b * kv

    shapes = [(b, t, kv) for b in (1, 2, 4, 8) for t in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) for kv in (64, 256, 512)]
    model = LatencyModel(half_life=float("inf"))
    for b, t, kv in shapes:
        model.observe(features(b, t, t, kv), seconds(b, t, kv))
    model.fit()
    assert max(abs(model.predict(features(1, t, t, 256)) / seconds(1, t, 256) - 1) for t in range(1, 33)) < 0.06


def test_recent_steps_outweigh_stale_ones():
    """After the machine slows down 2x, the online fit follows the new times."""
    rng = random.Random(0)
    coef = [0.02, 0.01, 0.005, 0.0, 5e-4, 0.0, 1e-5, 0.0]
    model = LatencyModel(half_life=64, refit_every=8)
    for x, t in synthetic(coef, SHAPES * 3, 0.01, rng):
        model.observe(x, t)
    slow = [2 * c for c in coef]
    for x, t in synthetic(slow, SHAPES * 2, 0.01, rng):
        model.observe(x, t)
    model.fit()
    assert model.mape(synthetic(slow, SHAPES, 0.0, rng)) < 0.1
    assert model.mape(synthetic(coef, SHAPES, 0.0, rng)) > 0.3


def test_a_loaded_calibration_stays_the_prior_of_online_refits():
    """Decoding that runs only plain steps (one regime of the features) refits the model on them:
    a loaded calibration keeps predicting the tree shapes it measured, where the same fit
    without it as the prior extrapolates from plain steps alone."""
    true = [0.02, -0.015, 0.014, 0.002, 0.004, 1e-4, 0.017, 7e-4, 0.0, 0.0, 0.0]  # the shape of a real CPU fit
    trees = [features(8, t, t, 256) for t in (2, 4, 8)] + [features(1, t, t, 256) for t in (4, 16, 32)]

    def cost(x):
        return sum(c * v for c, v in zip(true, x))

    def tree_error(model, plain_steps):
        for x in plain_steps:
            model.observe(x, 1.1 * cost(x))  # plain steps measure 10% slower than calibrated
        return model.mape([(x, cost(x)) for x in trees])

    batch8 = [features(8, 1, 1, kv, tokens=1 + kv // 7 % 8) for kv in range(100, 400, 3)]  # rows finishing
    batch1 = [features(1, 1, 1, kv) for kv in range(100, 400, 3)]
    for plain_steps in (batch8, batch1):
        assert tree_error(LatencyModel.from_dict(LatencyModel(coef=true).to_dict()), plain_steps) < 0.3
        assert tree_error(LatencyModel(coef=list(true)), plain_steps) > 0.4


def test_predictions_need_data_and_round_trip():
    model = LatencyModel()
    assert not model.ready
    with pytest.raises(RuntimeError, match="calibrat"):
        model.predict(features(1, 1, 1, 10))
    model.observe(features(1, 4, 4, 10), 0.05)
    copy = LatencyModel.from_dict(model.to_dict())
    assert copy.predict(features(1, 4, 4, 10)) == model.predict(features(1, 4, 4, 10))
    bad = dict(model.to_dict(), features=list(FEATURES[:-1]))
    with pytest.raises(ValueError, match="propd calibrate"):
        LatencyModel.from_dict(bad)


def test_calibrate_measures_the_grid_and_reports_held_out_error():
    import propd_compile

    model = tiny_model("llama")
    plain = calibrate(model, eager_forward(model), batch_sizes=(2,), tree_sizes=(2, 4), kv_lengths=(8,), repeats=1, progress=False)
    assert [p["sizes"] for p in plain["points"]] == [None, None]  # HF's attention: padded steps only
    propd_compile.accelerate(model, propd_compile.ProPDConfig(compile=False))  # attention takes ragged steps
    report = calibrate(model, eager_forward(model), batch_sizes=(1, 2), tree_sizes=(1, 4, 16), kv_lengths=(8, 32),
                       repeats=1, progress=False)
    propd_compile.restore(model)
    padded = [p for p in report["points"] if p["sizes"] is None]
    ragged = [p for p in report["points"] if p["sizes"] is not None]
    assert len(padded) == 12 and len(ragged) == 2  # ragged: batch 2, trees 4 and 16, at the middle KV
    assert all(p["batch"] == len(p["sizes"]) and p["sizes"][0] == p["tree"] >= max(p["sizes"]) for p in ragged)
    assert report["held_out_points"] == 4
    assert report["held_out_mape"] >= 0 and all(p["seconds"] > 0 for p in report["points"])
    fit = LatencyModel.from_dict(report["fit"])
    assert fit.predict(features(2, 16, 16, 32)) > 0


def test_a_calibration_from_another_propd_is_ignored_not_fatal(tmp_path, monkeypatch, caplog):
    """A fit saved with other features (an older propd), or of other kernels (torch or propd's
    compiled code changed since), is skipped with a warning; decoding then measures its own
    steps instead of failing. A fit of these kernels loads."""
    import json

    from propd_compile.cost_model import calibration_path, kernels_id, load_calibration, save_calibration

    monkeypatch.setenv("PROPD_CACHE", str(tmp_path))
    model = tiny_model("llama")
    path = calibration_path(model)
    path.parent.mkdir(parents=True)
    old_features = {"features": ["1", "B*T"], "coef": [0.1, 0.2], "half_life": 1.0, "ridge": 0.0}
    path.write_text(json.dumps({"fit": old_features, "kernels": kernels_id()}))
    with caplog.at_level("WARNING"):
        assert load_calibration(model) is None
    assert "propd calibrate" in caplog.text and str(path) in caplog.text
    fit = LatencyModel(coef=[0.01] * len(FEATURES)).to_dict()
    save_calibration(model, {"fit": fit, "points": [{"batch": 4}]})
    loaded = load_calibration(model)
    assert loaded is not None and loaded.coef == fit["coef"] and loaded.max_batch == 4
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "kernels": "torch 2.0, propd kernels 0000"}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_calibration(model) is None
    assert "other kernels" in caplog.text and "propd warmup" in caplog.text
    path.write_text("{not json")
    assert load_calibration(model) is None
