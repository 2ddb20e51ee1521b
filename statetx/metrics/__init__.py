"""cell-eval-compatible evaluation: metrics, differential expression and VCC scoring."""

from __future__ import annotations

from statetx.metrics.ceiling import fraction_of_ceiling
from statetx.metrics.de import wilcoxon_de
from statetx.metrics.evaluate import (
    PROFILES,
    FewCellsWarning,
    NoSpreadWarning,
    ceiling,
    evaluate,
)
from statetx.metrics.vcc import cell_mean_baseline, prep_vcc, score_agg, vcc_score

__all__ = ["PROFILES", "FewCellsWarning", "NoSpreadWarning", "ceiling", "cell_mean_baseline",
           "evaluate", "fraction_of_ceiling", "prep_vcc", "score_agg", "vcc_score",
           "wilcoxon_de"]
