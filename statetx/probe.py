"""Which attention mode a checkpoint was trained with: a report on real cells, never a choice.

arc-state 0.9.x Llama checkpoints do not record whether they ran bidirectional or causal
(spec arc-checkpoints.md §7). :func:`probe_attention` predicts real perturbed cells under each
candidate mode and reports how far each prediction is from the real cells (energy distance per
(cell type, perturbation) group, the training loss); the mode the weights were trained with
usually fits clearly better, while an undertrained model may not differ measurably.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from statetx._options import ARCH_CHOICES
from statetx._utils import say
from statetx.errors import ConfigError, DataError
from statetx.losses import energy_distance
from statetx.predict import align_genes

if TYPE_CHECKING:
    from statetx.model import StateTransitionModel

MODES = ARCH_CHOICES["attention"]


def probe_attention(model_or_run: StateTransitionModel | str | Path, adata: ad.AnnData, *,
                    checkpoint: str = "final.ckpt", modes: Sequence[str] = MODES,
                    n_groups: int | None = 50, seed: int = 0,
                    **predict_options: Any) -> pd.DataFrame:
    """Energy distance between predicted and real cells under each attention mode.

    Parameters
    ----------
    model_or_run
        An arc-state run directory (imported once per mode, without positions) or a fitted
        model (copied with its attention switched).
    adata
        Real cells with their controls, labelled as the model expects (columns from the model,
        or ``predict_options``).
    checkpoint
        The checkpoint of an arc-state run directory.
    modes
        The attention modes compared (default: all, ``bidirectional`` and ``causal``).
    n_groups, seed
        At most ``n_groups`` (cell type, perturbation) groups of two or more cells, a seeded
        choice (None: all); ``seed`` also seeds the basal draws.
    **predict_options
        Passed to the model's ``predict`` (``seed`` and ``predict_controls`` are the probe's).

    Returns
    -------
    DataFrame
        One row per mode (``mode``, ``energy`` = mean over groups, ``n_groups``), lowest energy
        first; it is also printed.
    """
    if n_groups is not None and (isinstance(n_groups, bool) or int(n_groups) < 1):
        raise ConfigError(f"n_groups={n_groups!r} must be a positive number of groups or None.")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"attention mode {mode!r} is invalid; expected one of {MODES}.")
    rows = []
    for mode in modes:
        model = _with_attention(model_or_run, mode, checkpoint)
        energies = _group_energies(model, adata, n_groups, seed, predict_options)
        rows.append({"mode": mode, "energy": float(np.mean(energies)),
                     "n_groups": len(energies)})
    table = pd.DataFrame(rows).sort_values("energy", kind="stable").reset_index(drop=True)
    say("probe_attention (energy distance of predicted to real cells, lower fits "
        "better; a report, not a choice):")
    print(table.to_string(index=False))
    return table


def _with_attention(source: Any, mode: str, checkpoint: str) -> StateTransitionModel:
    from statetx.model import StateTransitionModel

    if isinstance(source, (str, Path)):
        return StateTransitionModel.from_arc_state(source, checkpoint, attention=mode, rope=None,
                                                   verbose=False)
    if not isinstance(source, StateTransitionModel) or not hasattr(source, "network_"):
        raise ConfigError("probe_attention needs an arc-state run directory or a fitted "
                          f"StateTransitionModel, got {type(source).__name__}.")
    model = copy.deepcopy(source)
    model.network_config_.attention = mode
    model.network_.config.attention = mode
    return model


def _group_energies(model: StateTransitionModel, adata: ad.AnnData, n_groups: int | None,
                    seed: int, predict_options: dict) -> list[float]:
    c = model.columns_
    pert_col = predict_options.get("pert_col") or c.pert_col
    ct_col = predict_options.get("cell_type_col") or c.cell_type_key
    control = predict_options.get("control_pert") or c.control_pert
    if pert_col in adata.obs and (adata.obs[pert_col].astype(str) == str(control)).all():
        raise DataError("probe_attention needs perturbed cells (two or more per cell type and "
                        "perturbation) with their controls in the input; it has controls only.")
    taken = sorted({"seed", "predict_controls"} & set(predict_options))
    if taken:
        raise ConfigError(f"probe_attention sets {', '.join(taken)} itself (its own seed= "
                          "argument seeds the basal draws); leave them out of predict_options.")
    pred = model.predict(adata, seed=seed, predict_controls=False, **predict_options)
    key = f"{c.embed_key}_pred"
    latent = np.asarray(pred.obsm.get(key, pred.X), dtype=np.float32)
    real_all = align_genes(adata, model.var_names_, c.embed_key,
                           gene_name_col=c.gene_name_col)
    if latent.shape[1] != real_all.shape[1]:
        raise DataError("probe_attention compares predictions with the input cells, but this "
                        f"model predicts {latent.shape[1]} values per cell from "
                        f"{real_all.shape[1]} inputs.")
    where = pd.Index(adata.obs_names).get_indexer(pred.obs_names)
    labels = pd.DataFrame({"ct": pred.obs[ct_col].astype(str).to_numpy() if ct_col in pred.obs
                           else "all", "pert": pred.obs[pert_col].astype(str).to_numpy()})
    groups = sorted((k, v) for k, v in labels.groupby(["ct", "pert"]).indices.items()
                    if k[1] != str(control) and len(v) > 1)
    if not groups:
        raise DataError("probe_attention needs perturbed cells (two or more per cell type and "
                        "perturbation) with their controls in the input.")
    if n_groups is not None and len(groups) > n_groups:
        pick = np.random.default_rng(seed).choice(len(groups), size=n_groups, replace=False)
        groups = [groups[i] for i in sorted(pick)]
    out = []
    for _, idx in groups:
        x = torch.from_numpy(latent[idx])[None]
        y = torch.from_numpy(real_all[where[idx]])[None]
        out.append(float(energy_distance(x, y)[0]))
    return out
