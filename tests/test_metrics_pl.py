"""statetx.pl: delta scatter and metric bars render with the Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from statetx import pl  # noqa: E402
from statetx.errors import ConfigError, DataError  # noqa: E402
from statetx.metrics._synthetic import synthetic_log1p  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    real, eff = synthetic_log1p(4, 20, 30, 30, seed=1)
    pred, _ = synthetic_log1p(4, 15, 30, 30, seed=2, effects=eff)
    return pred, real


def test_delta_scatter(pair):
    ax = pl.delta_scatter(pair[0], pair[1], "target_gene", "non-targeting", perts=["G000", "G002"])
    assert len(ax.collections) == 2
    assert "G000" in ax.get_legend().get_texts()[0].get_text()
    fig, ax2 = plt.subplots()
    assert pl.delta_scatter(*pair, ax=ax2) is ax2
    with pytest.raises(DataError, match="nope"):
        pl.delta_scatter(*pair, perts=["nope"])
    plt.close("all")


def test_metric_bars():
    a = pd.DataFrame({"perturbation": ["x", "y"], "pearson_delta": [0.5, 0.7], "mae": [0.1, 0.2]})
    b = pd.DataFrame({"statistic": ["count", "mean"], "pearson_delta": [2, 0.2], "mae": [2, 0.3]})
    ax = pl.metric_bars({"st": a, "baseline": b}, metrics=["pearson_delta", "mae"])
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.15, 0.2, 0.3, 0.6]
    long = pd.DataFrame({"model": ["m1", "m2"], "metric": ["mae", "mae"], "value": [1.0, 2.0]})
    assert len(pl.metric_bars(long, metrics=["mae"]).patches) == 2
    with pytest.raises(ConfigError, match="pds"):
        pl.metric_bars(long, metrics=["pds"])
    plt.close("all")
