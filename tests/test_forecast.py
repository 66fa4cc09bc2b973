"""The load forecasters (moepipe/placement/forecast.py) on crafted histories: pure numpy, fast."""
import numpy as np
import pytest

from moepipe.config import FORECASTERS
from moepipe.placement.forecast import (
    Forecast, as_forecast, chunked, detect_shift, ema, ema_update, forecast, last, periodic, shift_errors, trend, window,
)

E = 16


def hot_block(step: int, period: int, offset: int, width: int = 4, strength: float = 8.0) -> np.ndarray:
    """Tokens per expert with a hot block of `width` experts that moves by `offset` every `period` steps."""
    w = np.ones(E)
    w[:width] = strength
    return 1000 * np.roll(w, offset * (step // period))


def test_ema_is_the_old_fold_bit_for_bit():
    rng = np.random.default_rng(3)
    rows = [rng.uniform(0, 500, E) for _ in range(7)]
    for decay in (0.0, 0.7, 0.8):
        ref = rows[0].copy()
        for x in rows[1:]:  # the fold moepipe has always run: decay * old + (1 - decay) * new
            ref = decay * ref + (1 - decay) * x
        assert np.array_equal(ema(rows, 10, decay).mean, ref)
        assert np.array_equal(ema(np.stack(rows[:2]), 1, decay).mean, ema_update(rows[0], rows[1], decay))
    assert ema(rows, 10, 0.8).scenarios is None


def test_last_and_window():
    h = np.array([[1.0, 5.0], [3.0, 1.0], [5.0, 3.0]])
    assert last(h, 4, 0.8).mean.tolist() == [5.0, 3.0]
    f = window(h, 4, 0.8)
    assert f.mean.tolist() == [3.0, 3.0]
    assert f.scenarios.tolist() == h.tolist() and np.allclose(f.weights, 1 / 3)  # the window's steps, equally likely
    long = window(np.arange(20.0)[:, None] * np.ones((1, 3)), 1, 0.8)
    assert len(long.scenarios) == 8 and np.allclose(long.weights @ long.scenarios, long.mean) and long.mean[0] == 9.5


def test_trend_extrapolates_a_linear_ramp_over_the_horizon():
    t = np.arange(10.0)[:, None]
    rising, falling = 100 + 7 * t, 200 - 3 * t
    h = np.hstack([rising, falling, np.full_like(t, 50.0)])
    f = trend(h, 6, 0.8)
    ahead = np.arange(10.0, 16.0)
    assert np.allclose(f.mean, [np.mean(100 + 7 * ahead), np.mean(200 - 3 * ahead), 50.0])
    assert np.allclose(f.scenarios[0], [170, 170, 50]) and np.allclose(f.scenarios[-1], [205, 155, 50])  # step by step
    assert np.allclose(window(h, 6, 0.8).mean[0], 131.5)  # the window mean lags the ramp


def test_trend_clips_at_zero_and_keeps_the_total():
    t = np.arange(8.0)[:, None]
    h = np.hstack([40 - 5 * t, 60 + 5 * t])  # expert 0 runs dry at step 8; the total stays 100
    f = trend(h, 10, 0.8)
    assert (f.scenarios >= 0).all() and np.allclose(f.scenarios.sum(axis=1), 100.0)
    assert np.allclose(f.mean, [0.0, 100.0])


def test_periodic_predicts_a_block_that_moves_by_a_constant_offset_each_period():
    for period, offset in ((5, 2), (3, 1), (7, -3)):
        h = np.stack([hot_block(s, period, offset) for s in range(30)])
        assert detect_shift(h) == (period, offset)
        future = np.stack([hot_block(s, period, offset) for s in range(30, 30 + 2 * period)])
        f = periodic(h, len(future), 0.8)
        assert np.allclose(f.mean, future.mean(axis=0))
        assert np.allclose(f.weights @ f.scenarios, f.mean)
        # the other forecasters plan for where the block was
        for other in (last, ema, window, trend):
            assert np.abs(other(h, len(future), 0.8).mean - future.mean(axis=0)).sum() > 0.1 * future.mean(axis=0).sum()


def test_periodic_survives_token_noise_and_finds_plain_periodicity():
    rng = np.random.default_rng(0)
    truth = np.stack([hot_block(s, 5, 2) for s in range(40)])
    noisy = np.stack([rng.multinomial(4000, p / p.sum()) for p in truth]).astype(float)
    assert detect_shift(noisy) == (5, 2)
    burst = np.stack([hot_block(0, 1, 0) if s % 6 == 0 else np.full(E, 1000.0) for s in range(36)])
    assert detect_shift(burst) == (6, 0)  # every 6th step hot: x_t = x_{t-6}
    f = periodic(burst, 6, 0.8)
    assert np.allclose(f.mean, (hot_block(0, 1, 0) + 5 * np.full(E, 1000.0)) / 6)


def test_periodic_on_a_steady_load_is_a_smoothed_mean():
    rng = np.random.default_rng(1)
    base = rng.uniform(10, 100, E)
    assert detect_shift(np.tile(base, (12, 1))) == (1, 0)
    noisy = np.stack([rng.poisson(base * 50) for _ in range(32)]).astype(float)
    assert detect_shift(noisy)[0] == 1
    assert np.abs(periodic(noisy, 10, 0.8).mean / 50 - base).max() < 0.15 * base.max()


def test_shift_errors_match_the_direct_sum():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 10, (12, 6))
    err = shift_errors(x, 4)
    scale = (x * x).sum(axis=1).mean()
    for p in (1, 4):
        for d in (0, 1, 5):
            direct = np.mean([((x[t] - np.roll(x[t - p], d)) ** 2).sum() for t in range(p, 12)]) / scale
            assert err[p - 1, d] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("name", FORECASTERS)
def test_every_builtin_by_name_is_pure_and_shaped(name):
    rng = np.random.default_rng(4)
    h = rng.uniform(0, 100, (9, E))
    given = h.copy()
    f = forecast(name, h, 5, 0.8)
    assert np.array_equal(h, given) and f.mean.shape == (E,) and (f.mean >= 0).all()
    one = forecast(name, h[:1], 5, 0.8)  # a single observation forecasts itself
    assert np.allclose(one.mean, h[0])


def test_as_forecast_checks_what_a_plugin_returns():
    assert as_forecast(np.ones(3), 3).scenarios is None
    with pytest.raises(ValueError, match="3 finite loads"):
        as_forecast(np.ones(2), 3)
    with pytest.raises(ValueError, match="sum"):
        as_forecast(Forecast(np.ones(3), np.ones((2, 3)), np.array([0.5, 0.6])), 3)
    default = as_forecast(Forecast(np.ones(3), np.ones((2, 3))), 3)
    assert default.weights.tolist() == [0.5, 0.5]
    assert np.allclose(chunked(np.arange(6.0)[:, None], 4).weights, [2 / 6, 2 / 6, 1 / 6, 1 / 6])
