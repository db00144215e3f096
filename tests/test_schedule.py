"""Mode-weight presets at their boundaries, custom breakpoints, and the per-sample mode draw."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profuser.schedule import PRESETS, draw_modes, mode_weights, preset_beta, sampling_scale, validate_custom_weights

TOTAL = 100


def weights(preset, step, total=TOTAL, **kw):
    return mode_weights(preset, step, total, **kw)


def test_profuser_switches_at_fraction():
    assert weights("profuser", 0) == (1.0, 0.0)
    assert weights("profuser", 49) == (1.0, 0.0)  # just before 0.5 * 100
    assert weights("profuser", 50) == (0.1, 1.0)  # at the switch
    assert weights("profuser", TOTAL - 1) == (0.1, 1.0)
    assert weights("profuser", 29, switch_fraction=0.3, stage2_inference_weight=0.25) == (1.0, 0.0)
    assert weights("profuser", 30, switch_fraction=0.3, stage2_inference_weight=0.25) == (0.25, 1.0)
    # switch at a non-integer step: 0.25 * 10 = 2.5 -> steps 0, 1, 2 are stage 1
    assert [weights("profuser", s, 10, switch_fraction=0.25)[1] for s in range(10)] == [0, 0, 0] + [1] * 7
    assert weights("profuser", 0, switch_fraction=0.0) == (0.1, 1.0)
    assert weights("profuser", TOTAL - 1, switch_fraction=1.0) == (1.0, 0.0)


def test_reverse_is_the_mirror_of_profuser():
    assert weights("reverse", 0) == (0.0, 1.0)
    assert weights("reverse", 49) == (0.0, 1.0)
    assert weights("reverse", 50) == (1.0, 0.1)
    assert weights("reverse", TOTAL - 1) == (1.0, 0.1)
    for step in range(TOTAL):
        w_inf, w_train = weights("profuser", step, switch_fraction=0.3)
        assert weights("reverse", step, switch_fraction=0.3) == (w_train, w_inf)


@pytest.mark.parametrize(
    "preset, expected",
    [("simul", (1.0, 1.0)), ("fusellm", (0.0, 1.0)), ("inference_only", (1.0, 0.0)), ("sft", (0.0, 1.0))],
)
def test_constant_presets(preset, expected):
    for step in (0, 1, 49, 50, TOTAL - 1, TOTAL, 10 * TOTAL):
        assert weights(preset, step) == expected


def test_sft_forces_beta_zero():
    assert preset_beta("sft", 1.0) == 0.0
    for preset in PRESETS:
        if preset != "sft":
            assert preset_beta(preset, 0.7) == 0.7
    with pytest.raises(ValueError, match="schedule preset 'SFT' is not one of"):
        preset_beta("SFT", 1.0)
    with pytest.raises(ValueError, match=r"beta=-1 must be a finite number >= 0"):
        preset_beta("profuser", -1)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_ramp_endpoints_and_monotonicity(shape):
    ws = [weights("ramp", s, ramp_shape=shape) for s in range(TOTAL)]
    assert ws[0] == (1.0, 0.0)
    assert ws[-1][0] == pytest.approx(0.0, abs=1e-12) and ws[-1][1] == pytest.approx(1.0)
    assert weights("ramp", TOTAL + 5, ramp_shape=shape) == ws[-1]  # stays at the end
    for (a_inf, a_tr), (b_inf, b_tr) in zip(ws, ws[1:]):
        assert b_tr > a_tr and b_inf < a_inf
    for w_inf, w_train in ws:
        assert w_inf + w_train == pytest.approx(1.0)
    mid = weights("ramp", 50, 101, ramp_shape=shape)  # progress exactly 0.5
    assert mid[1] == pytest.approx(0.5)


def test_ramp_shapes_differ():
    # at progress 0.25: linear 0.25, cosine (1 - cos(pi / 4)) / 2
    assert weights("ramp", 25, 101, ramp_shape="linear")[1] == pytest.approx(0.25)
    assert weights("ramp", 25, 101, ramp_shape="cosine")[1] == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert weights("ramp", 0, 1) == (1.0, 0.0)  # a one-step run does not divide by zero


def test_custom_breakpoints_piecewise_constant():
    bps = [[0.0, 1.0, 0.0], [0.25, 0.5, 0.5], [0.8, 0.0, 2.0]]
    got = {s: weights("custom", s, custom_weights=bps) for s in (0, 24, 25, 79, 80, TOTAL - 1, TOTAL)}
    assert got == {
        0: (1.0, 0.0), 24: (1.0, 0.0), 25: (0.5, 0.5), 79: (0.5, 0.5),
        80: (0.0, 2.0), TOTAL - 1: (0.0, 2.0), TOTAL: (0.0, 2.0),
    }
    assert weights("custom", 7, custom_weights=[(0, 3, 1)]) == (3.0, 1.0)  # tuples and ints are fine
    # custom_weights is ignored by the other presets
    assert weights("profuser", 0, custom_weights=bps) == (1.0, 0.0)


@pytest.mark.parametrize(
    "bps, match",
    [
        (None, "needs a non-empty list"),
        ([], "needs a non-empty list"),
        ([[0.1, 1, 0]], r"custom_weights\[0\] fraction 0.1 must be 0"),
        ([[0, 1, 0], [0.5, 1, 1], [0.5, 0, 1]], "must strictly increase; got 0.5 then 0.5"),
        ([[0, 1, 0], [0.6, 1, 1], [0.5, 0, 1]], "must strictly increase; got 0.6 then 0.5"),
        ([[0, -1, 1]], r"custom_weights\[0\]\[1\]=-1 must be a finite number >= 0"),
        ([[0, 1, float("nan")]], r"custom_weights\[0\]\[2\]=nan"),
        ([[0, 0, 0]], "cannot both be 0"),
        ([[0, 1, 0], [1.5, 0, 1]], r"fraction 1.5 must be in \[0, 1\]"),
        ([[0, 1]], r"custom_weights\[0\]=\[0, 1\] must be \[fraction, w_inf, w_train\]"),
        ([[0, "1", 0]], r"custom_weights\[0\]\[1\]='1'"),
    ],
)
def test_custom_invalid(bps, match):
    with pytest.raises(ValueError, match=match):
        weights("custom", 0, custom_weights=bps)


@pytest.mark.parametrize(
    "preset, step, total, kw, match",
    [
        ("progressive", 0, 10, {}, r"schedule preset 'progressive' is not one of \('profuser', 'ramp'"),
        ("ramp", 0, 10, dict(ramp_shape="exp"), r"ramp_shape='exp' is not one of \('linear', 'cosine'\)"),
        ("profuser", 0, 0, {}, r"total_steps=0 must be an int >= 1"),
        ("profuser", -1, 10, {}, r"step=-1 must be an int >= 0"),
        ("profuser", 1.5, 10, {}, r"step=1.5"),
        ("profuser", 0, 10, dict(switch_fraction=1.2), r"switch_fraction=1.2 must be in \[0, 1\]"),
        ("profuser", 0, 10, dict(stage2_inference_weight=-0.1), r"stage2_inference_weight=-0.1"),
    ],
)
def test_invalid_arguments(preset, step, total, kw, match):
    with pytest.raises(ValueError, match=match):
        mode_weights(preset, step, total, **kw)


@settings(max_examples=200, deadline=None)
@given(preset=st.sampled_from(PRESETS), total=st.integers(1, 500), data=st.data())
def test_weights_valid_for_every_step(preset, total, data):
    step = data.draw(st.integers(0, 2 * total))
    kw = dict(switch_fraction=data.draw(st.floats(0, 1)), ramp_shape=data.draw(st.sampled_from(["linear", "cosine"])))
    if preset == "custom":
        kw["custom_weights"] = [[0.0, 1.0, 0.0], [0.5, 0.2, 1.0]]
    w_inf, w_train = mode_weights(preset, step, total, **kw)
    assert w_inf >= 0 and w_train >= 0 and w_inf + w_train > 0
    assert (w_inf, w_train) == mode_weights(preset, step, total, **kw)  # pure


def test_validate_custom_weights_returns_floats():
    assert validate_custom_weights([[0, 1, 0], [0.5, 2, 3]]) == [(0.0, 1.0, 0.0), (0.5, 2.0, 3.0)]


# ---------------------------------------------------------------------------------------------
# sampling variant

KEYS = [f"sample-{i}" for i in range(4000)]


def test_draw_modes_deterministic():
    a = draw_modes(0.1, 1.0, KEYS[:50], seed=3, step=17)
    assert a == draw_modes(0.1, 1.0, KEYS[:50], seed=3, step=17)  # resume draws the same
    assert a[10:20] == draw_modes(0.1, 1.0, KEYS[10:20], seed=3, step=17)  # independent of batch makeup
    assert set(a) <= {"inference", "training"}
    even = KEYS[:200]
    assert draw_modes(1, 1, even, seed=3, step=17) != draw_modes(1, 1, even, seed=4, step=17)
    assert draw_modes(1, 1, even, seed=3, step=17) != draw_modes(1, 1, even, seed=3, step=18)


@pytest.mark.parametrize("w_inf, w_train", [(1.0, 1.0), (0.1, 1.0), (3.0, 1.0)])
def test_draw_modes_proportions(w_inf, w_train):
    modes = draw_modes(w_inf, w_train, KEYS, seed=0, step=5)
    share = modes.count("inference") / len(modes)
    p = w_inf / (w_inf + w_train)
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / len(modes))  # loose: 5 standard errors


def test_zero_weight_mode_never_drawn():
    for step in range(5):
        assert set(draw_modes(0.0, 1.0, KEYS[:500], seed=1, step=step)) == {"training"}
        assert set(draw_modes(2.0, 0.0, KEYS[:500], seed=1, step=step)) == {"inference"}


def test_sampling_scale_makes_expectation_the_weighted_sum():
    w_inf, w_train = 0.1, 1.0
    assert sampling_scale(w_inf, w_train) == pytest.approx(1.1)
    l_inf, l_train = 2.0, 5.0
    p = w_inf / (w_inf + w_train)
    expected = sampling_scale(w_inf, w_train) * (p * l_inf + (1 - p) * l_train)
    assert expected == pytest.approx(w_inf * l_inf + w_train * l_train)
    # and empirically with the real draw
    modes = draw_modes(w_inf, w_train, KEYS, seed=9, step=0)
    est = sum(sampling_scale(w_inf, w_train) * (l_inf if m == "inference" else l_train) for m in modes) / len(modes)
    assert est == pytest.approx(w_inf * l_inf + w_train * l_train, rel=0.03)


@pytest.mark.parametrize(
    "w_inf, w_train, match", [(0, 0, "both 0"), (-1, 1, r"w_inf=-1"), (1, float("inf"), "w_train=inf")]
)
def test_draw_invalid_weights(w_inf, w_train, match):
    with pytest.raises(ValueError, match=match):
        draw_modes(w_inf, w_train, KEYS[:3], seed=0, step=0)
    with pytest.raises(ValueError, match=match):
        sampling_scale(w_inf, w_train)
