"""``StateTransitionModel``: the scikit-learn-style estimator around the ST network.

``__init__`` only stores parameters; ``fit`` validates the data against the split spec, builds the
network from a preset, trains it with :class:`statetx.train.Trainer` and returns ``self``; learned
state ends in ``_``. Fitted models pickle (weights travel as CPU tensors, so a CUDA-trained model
unpickles on a CPU-only machine) and save to a directory that loads without executing code.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import NotFittedError

from statetx import persist
from statetx._context import on_command_line
from statetx._params import Estimator
from statetx._utils import (
    as_count,
    as_seed,
    check_number,
    deepcopy_sharing,
    did_you_mean,
    history_frame,
    matmul_precision_scope,
    names_list,
    preview,
    say,
    sigterm_unwinds,
    warn,
)
from statetx.config import ColumnMap, SplitConfig
from statetx.data import (
    PreparedData,
    SplitData,
    batch_in_context,
    counts_source,
    split_cell_obs,
    split_datasets,
    split_obs,
    warn_training_scale,
    with_training_var,
)
from statetx.distributed import (
    env_local_rank,
    init_distributed,
    raise_together,
    resolve_device,
)
from statetx.errors import ConfigError, DataError
from statetx.io import gene_names, obs_labels, recorded_target_sum
from statetx.losses import get_loss, split_loss_kwargs
from statetx.nn import NetworkConfig, StateTransitionNetwork
from statetx.persist import _FeatureRows  # noqa: F401 (named by pickles made before it moved)
from statetx.predict import (
    UNTRAINED_MODES,
    Group,
    GroupMeans,
    align_genes,
    basal_groups,
    batches_without_controls,
    check_input_scale,
    check_matmul_precision,
    check_predict_options,
    clip_range,
    control_depths,
    encode_batches,
    encode_perturbations,
    first_positions,
    group_key,
    group_rng,
    hvg_names,
    input_columns,
    input_labels,
    input_matrix,
    mark_scale,
    output_scale,
    pairing_batches,
    resize_groups,
    resolve_pool,
    run_groups,
    split_groups,
    warn_batch_fallback,
    weights_digest,
)
from statetx.presets import describe, network_config_for, resolve_architecture
from statetx.runconfig import reference_name_hint
from statetx.rundir import (
    ManagedRun,
    attach_data,
    finish_run,
    has_checkpoints,
    load_model,
    looks_like_run,
    set_aside,
    settle_aside,
    write_run_files,
)
from statetx.sets import (
    CellSetSampler,
    ReadDepthThinning,
    check_read_depth,
    check_sampler_options,
    pert_inputs,
    pert_table,
)
from statetx.stream import make_sampler, preparer, stream_settings
from statetx.train import TrainConfig, Trainer, check_flag, start_at_mean_response
from statetx.vocab import (
    Vocab,
    features_entry,
    load_pert_features,
)

#: ``preset="auto"`` picks ``small`` below this many training cells, else ``state_sm``.
AUTO_SMALL_MAX_CELLS = 100_000
AUTO_PRESETS = ("small", "state_sm")

#: Training settings used when ``batch_size`` / ``max_steps`` / ``lr`` are left as None and
#: ``weight_averaging`` as ``"auto"``. Named reference presets keep the reference's values (batch
#: 16, 40,000 steps, lr 1e-4, no averaging); the ``small`` preset (chosen by ``preset="auto"`` for
#: data of up to ~100k cells) trains for a fixed number of passes over the training cells and
#: returns the running mean of its weights, both tuned on held-out validation folds
#: (benchmarks/quality/README.md).
#: ``val_freq`` left as None: a tenth of ``max_steps``, at most this.
AUTO_VAL_FREQ = 2000
TRAINING_DEFAULTS: dict[str, dict] = {
    "*": {"batch_size": 16, "max_steps": 40_000, "lr": 1e-4, "weight_averaging": "none"},
    "small": {"batch_size": 8, "max_steps": "epochs", "passes": 100, "min_steps": 300,
              "max_steps_cap": 3000, "lr": 1e-3, "weight_averaging": "uniform"},
}


def input_gene_col(columns: ColumnMap, given: str | bool | None) -> str | None:
    """The input's gene-name column: as given (False: var_names), else the training one."""
    return columns.gene_name_col if given is None else given or None


@dataclass(frozen=True)
class FitPlan:
    """What a fit trains, resolved from its prepared data (:meth:`StateTransitionModel._plan`,
    shared by ``fit`` and the command line's dry run)."""

    n_train: int  #: training cells (targets of the training split)
    n_used: int  #: of those, the cells that train (``downsample_cells``: at most that many a group)
    preset: str  #: the preset (``"auto"`` resolved from ``n_train``)
    arch: dict  #: its architecture, ``model_kwargs`` and ``cell_set_len`` applied
    settings: dict  #: the training settings, defaults resolved (:meth:`_training_defaults`)
    net_cfg: NetworkConfig  #: the network, with the data's widths

    @property
    def set_len(self) -> int:
        return int(self.arch["cell_set_len"])


class StateTransitionModel(Estimator):
    """State Transition model: predicts perturbed cell sets from control cell sets.

    Parameters
    ----------
    preset
        Architecture preset: ``auto`` (default: ``small`` for up to ~100k training cells, else
        ``state_sm``), ``small``, ``tiny``, ``state_sm``, ``state``, ``state@0.11.1``,
        ``state_lg``, ``tahoe_best``, ``pertsets``; ``model_kwargs`` overrides any of its fields.
    pert_col, cell_type_key, batch_col, control_pert
        obs columns holding the perturbation, the context and (optionally) the batch; the control
        label (auto-detected among ``non-targeting`` / ``DMSO_TF`` when None).
    embed_key, output_space
        Cell representation (None = ``X``; else an obsm key such as ``X_hvg``) and output space
        (``gene``, ``all``, ``embedding``).
    gene_name_col
        var column holding the gene names (e.g. symbols when ``var_names`` are Ensembl IDs);
        genes are matched and outputs named by it, in training and prediction alike (every
        input then needs the column). None (default) = ``var_names``.
    model_kwargs
        Overrides of the preset's architecture fields (:class:`statetx.nn.NetworkConfig`), e.g.
        ``{"hidden_dim": 256, "dropout": 0.0, "attention": "causal"}``; None (default) = none.
    counts_key
        Where the gene-space target of a gene decoder comes from when the input is an
        embedding: an obsm key, or ``"X"`` (default None: ``obsm['X_hvg']`` for output space
        ``gene``, ``X`` for ``all``; arc-state hard-codes ``X_hvg``).
    allow_counts
        Output space ``all`` expects log1p-normalised X and refuses integer counts; True trains
        on counts anyway (predictions are then on that scale).
    cell_set_len
        Cells per set (default: the preset's).
    batch_size, max_steps, lr
        Sets per step, optimiser steps and learning rate; None = the preset's defaults
        (:data:`TRAINING_DEFAULTS`: reference presets 16 / 40,000 / 1e-4; ``small`` 8 / 100
        passes over the training cells (300–3,000 steps) / 1e-3). The resolved values are in
        ``train_settings_``.
    weight_averaging, averaging_start
        ``uniform``: training returns (and validates) the running mean of the weights over the
        optimiser steps after the fraction ``averaging_start`` of ``max_steps`` (Polyak /
        stochastic weight averaging; it removes the step-to-step noise of a constant learning
        rate); ``none``: the last weights; ``auto`` (default): ``uniform`` for the ``small``
        preset, ``none`` for the reference presets.
    val_freq
        Validate (when there is a ``val`` split: ``best.ckpt``, early stopping; ``last.ckpt``
        is written then too; not on a split of perturbations without training cells only,
        one-hot, said) every this many steps; None (default) = a tenth of ``max_steps``,
        at most 2,000 (the reference's 2,000 at its 40,000 steps; the ``small`` preset's
        300–3,000 steps validate 10 times, not only at the end).
    optimizer, weight_decay, lr_schedule, warmup_steps, gradient_clip_val,
    gradient_accumulation_steps, loss, ckpt_every_n_steps, log_every_n_steps, keep_last_n,
    early_stopping_patience, precision, matmul_precision
        Training settings (see :class:`statetx.train.TrainConfig`).
    loss_kwargs
        Loss options (spec model.md §10): ``blur`` (Sinkhorn, 0.05), ``sinkhorn_weight`` /
        ``energy_weight`` (``loss="se"``, 0.01 / 1.0), ``mmd_num_chunks`` (1: the set loss on k
        feature chunks, averaged), ``randomize_mmd_chunks`` (False), ``decoder_weight`` (alias
        ``decoder_loss_weight``, 1.0), ``detach_decoder`` (False: the gene decoder's loss does
        not train the network, and 10 % of its batches decode the true targets) and
        ``regularization`` (0: weight of mean |pred − basal|).
    compile, compile_mode
        ``torch.compile`` for training (GPU throughput; the first steps compile). Under bf16
        autocast (CUDA's default) the network and the loss are compiled as one graph and run at
        full fp32 matmul precision outside autocast; in fp32 only the network. ``compile_mode``:
        ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``,
        ``max-autotune-no-cudagraphs``.
    data_on_device
        ``auto`` (default): on CUDA, keep the training cells on the GPU when they take at most
        half of its free memory and gather each batch there; ``always`` / ``never``.
    train_pert_skip
        Whether the ``pert_skip`` parameters (the per-perturbation mean-response skip of the
        ``small`` preset, see :class:`statetx.nn.NetworkConfig`) keep training after being
        started at the training contexts' mean response (default True); False fixes them and
        trains only the transformer's corrections.
    basal_mapping_strategy
        Control pairing: ``random`` (same cell type), ``batch`` (same cell type and batch,
        falling back to the cell type) or ``auto`` (default: ``batch`` when ``batch_col`` is
        given, else ``random``). Prediction draws basal cells the same way.
    pert_features
        Optional perturbation feature file (``.pt``/``.npz``/``.csv``/``.safetensors``) or dict
        name → vector, instead of one-hot perturbations: every name of the table is known to
        the model, and ``predict(pert_features=...)`` adds vectors for others (saved with the
        model as ``pert_features.safetensors``).
    heldout_controls_in_train, yield_controls
        Whether the control cells of held-out (zero-shot) cell types train (default True, as
        the reference), and whether control cells are also targets, control sets mapping to
        control sets (default True; with False the control's one-hot embedding does not train
        either, and held-out perturbations are no longer predicted as the control).
    on_missing_perturbation
        A ``[fewshot]`` entry naming a perturbation no cell of that cell type carries:
        ``error`` (default) or ``warn`` (and ignore it).
    on_missing_features
        A perturbation of the data without a vector in ``pert_features``: ``zeros`` (default,
        the reference: a zero vector, with a warning listing them) or ``error``.
    drop_missing_labels
        Leave out cells whose perturbation, cell type or batch label is missing (NaN), with a
        notice (default False: an error naming the column).
    val_subsample_fraction
        Validate on the first ⌈n · fraction⌉ of the n validation parts (dataset, file, cell
        type), sorted (reference semantics; default 1.0 = all).
    drop_last
        Training drops the sets of a group's remainder (fewer than ``cell_set_len`` cells)
        instead of padding them with cells drawn from the group, and an incomplete last batch
        (default False). Validation always uses every set.
    exclude_self
        Never pair a control target cell with itself as its basal cell (default False: the
        reference may).
    cache_control_pairs
        Give every training and validation cell one control for the whole run, drawn without
        replacement within its group's pool (reference ``cache_perturbation_control_pairs``;
        a group with more cells than its pool is an error); default False: fresh draws every
        epoch. In-memory data only.
    downsample_cells
        Train and validate on at most this many cells of each (context, perturbation) group
        (and batch, with the ``batch`` pairing, the default when ``batch_col`` is given): a
        random subset drawn once from ``seed``, the same in every epoch (for data-scaling
        experiments or to balance groups); basal cells are still drawn from all control cells,
        and predictions use every cell. None (default) = all cells.
    downsample
        Read-depth downsampling of the expression rows training and validation read from X
        (the reference's ``downsample``): each time a cell is read its counts (``expm1`` and
        rounded for log1p data) are thinned binomially — with probability ``downsample`` when
        below 1, to about ``downsample`` counts per cell when above 1 — and log1p'd again.
        Needs cells or gene-space targets read from X (not an embedding). None / 1.0 (default)
        = off; prediction reads cells as given.
    pad_from
        How a group's short remainder set is padded to ``cell_set_len`` cells: ``group``
        (default: cells drawn from the whole group) or ``chunk`` (from the short set's own
        cells, as the reference: a 1-cell remainder becomes S copies of that cell).
    val_from_test
        With no validation part in the split spec, validate on the test parts (the reference's
        silent fallback; default False: validation is skipped and no best checkpoint is kept).
    additional_obs
        obs columns of the training files carried into :meth:`predict_split`'s outputs (and
        ``tx predict``'s ``adata_pred`` / ``adata_real``) next to the label columns, e.g.
        ``["dose", "plate"]`` (checked in every file when fitting). ``predict`` keeps every obs
        column of its input anyway. None (default) = none.
    dtype
        Storage of the training matrices (``float32`` or ``float16``).
    data_loading
        ``memory`` (default): the training cells are read into memory once. ``stream``
        (out-of-core, for data larger than memory): the training split stays on disk and each
        epoch reads it in contiguous chunks of ``stream_chunk_size`` file rows, visited in a
        seeded random order ``stream_buffer_chunks`` at a time (the next buffer is read while
        the current one trains); cell sets are drawn within the cells of the buffer, not from a
        whole group (a group with fewer than ``cell_set_len`` cells in the buffer gives one
        padded set, none with ``drop_last``: raise the buffer for files in random cell order),
        and basal cells from an in-memory reservoir of the control cells. Validation and test
        splits are still read into memory; ``predict_split("train")`` is unavailable. Before
        training, one pass over the training cells checks them for NaN/Inf (as loading them
        does in memory; shared out between the processes under torchrun). Peak memory ≈
        reservoir + two buffers (``2 · chunk · buffer · n_features · 4`` bytes; two more while
        validation evaluates training batches). See :mod:`statetx.stream`.
    stream_chunk_size, stream_buffer_chunks, stream_max_controls
        Streaming options (see ``data_loading``): file rows per contiguous read (default
        4,096), chunks per buffer (default 16), control cells kept in the reservoir per file
        and cell type (a seeded subset fixed for the run; default None = all).
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    seed
        Seeds every random choice: splits into sets, control pairing, initialisation, dropout.
    progress
        Print the start-up summary (preset, network, device) and a progress bar (default True).

    Attributes
    ----------
    network_, network_config_
        The trained :class:`statetx.nn.StateTransitionNetwork` (in eval mode) and its
        :class:`statetx.nn.NetworkConfig`.
    vocab_, columns_
        Perturbation / cell-type / batch vocabularies and the obs columns the model reads.
    var_names_, gene_names_, n_features_in_, feature_names_in_
        Input features in training order; the decoded genes (an embedding model with a gene
        decoder), else None.
    cell_set_len_, is_log1p_, is_counts_, target_sum_, expression_depth_, trained_perturbations_
        Cells per set; whether the training expression was log1p; whether expression not on
        log1p scale held integers only (raw counts; False: normalised values, so that
        ``predict`` refuses raw counts; None for log1p or embedding inputs and models saved
        before it was recorded); its counts per cell (when ``statetx.pp`` recorded one); per
        cell type, the median counts per cell its control cells' log1p values stand for over
        the input genes (checked against ``predict``'s input); perturbations with training
        cells.
    trained_batches_
        With a batch encoder, the batches with training cells: the others' embedding rows
        never trained, so their cells are predicted as unknown batches (``unknown_batch``);
        None without a batch encoder (or for a model that does not record them: every batch
        counts as trained).
    preset_, train_settings_
        The preset and the training settings (batch size, steps, lr, averaging) the fit used.
    history_, best_step_, training_time_
        One row per logged step (``train_loss``: the mean over the steps since the previous
        log, ``val_loss``, ``lr``, ...); the step of the best validation loss (-1 without
        validation); seconds of training (a resumed run's earlier segments included).
    split_config_, split_summary_
        The validated split spec and the cells / perturbations per split and context.
    finetuned_
        The :meth:`finetune_on_controls` calls made since the fit (absent when none).
    device_
        The device the network is on (where fit trained it; :meth:`to`, :meth:`load` and
        unpickling, onto the CPU, move it).
    run_dir_
        The run folder (``output_dir``, or the run a model was loaded from).
    """

    _fine_tunes = False  # (a subclass starting from trained weights: no size advice)
    _PICKLED_FIT = ("network_config_", "vocab_", "columns_", "var_names_", "cell_set_len_",
                    "is_log1p_")
    _MOVE_HINT = ("load it with the statetx that made it and move the model with save() / "
                  "load()")
    _name_hint = staticmethod(reference_name_hint)  # (arc-state's option names)

    def __init__(
        self,
        preset: str = "auto",
        *,
        pert_col: str = "gene",
        cell_type_key: str = "cell_type",
        batch_col: str | None = None,
        control_pert: str | None = None,
        embed_key: str | None = None,
        output_space: str = "gene",
        gene_name_col: str | None = None,
        counts_key: str | None = None,
        allow_counts: bool = False,
        model_kwargs: dict | None = None,
        cell_set_len: int | None = None,
        batch_size: int | None = None,
        max_steps: int | None = None,
        lr: float | None = None,
        weight_averaging: str = "auto",
        averaging_start: float = 0.0,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        gradient_clip_val: float | None = 10.0,
        gradient_accumulation_steps: int = 1,
        loss: str = "energy",
        loss_kwargs: dict | None = None,
        val_freq: int | None = None,
        ckpt_every_n_steps: int = 2000,
        log_every_n_steps: int = 50,
        keep_last_n: int | None = None,
        early_stopping_patience: int | None = None,
        precision: str = "auto",
        matmul_precision: str = "medium",
        compile: bool = False,
        compile_mode: str = "default",
        data_on_device: str = "auto",
        basal_mapping_strategy: str = "auto",
        train_pert_skip: bool = True,
        pert_features: Any = None,
        heldout_controls_in_train: bool = True,
        on_missing_perturbation: str = "error",
        on_missing_features: str = "zeros",
        val_subsample_fraction: float = 1.0,
        drop_missing_labels: bool = False,
        yield_controls: bool = True,
        drop_last: bool = False,
        exclude_self: bool = False,
        cache_control_pairs: bool = False,
        downsample_cells: int | None = None,
        downsample: float | None = None,
        pad_from: str = "group",
        val_from_test: bool = False,
        additional_obs: Sequence[str] | None = None,
        dtype: str = "float32",
        data_loading: str = "memory",
        stream_chunk_size: int = 4096,
        stream_buffer_chunks: int = 16,
        stream_max_controls: int | None = None,
        device: str = "auto",
        seed: int = 42,
        progress: bool = True,
    ) -> None:
        self.preset = preset
        self.pert_col = pert_col
        self.cell_type_key = cell_type_key
        self.batch_col = batch_col
        self.control_pert = control_pert
        self.embed_key = embed_key
        self.output_space = output_space
        self.gene_name_col = gene_name_col
        self.counts_key = counts_key
        self.allow_counts = allow_counts
        self.model_kwargs = model_kwargs
        self.cell_set_len = cell_set_len
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.weight_averaging = weight_averaging
        self.averaging_start = averaging_start
        self.warmup_steps = warmup_steps
        self.gradient_clip_val = gradient_clip_val
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.loss = loss
        self.loss_kwargs = loss_kwargs
        self.val_freq = val_freq
        self.ckpt_every_n_steps = ckpt_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.keep_last_n = keep_last_n
        self.early_stopping_patience = early_stopping_patience
        self.precision = precision
        self.matmul_precision = matmul_precision
        self.compile = compile
        self.compile_mode = compile_mode
        self.data_on_device = data_on_device
        self.basal_mapping_strategy = basal_mapping_strategy
        self.train_pert_skip = train_pert_skip
        self.pert_features = pert_features
        self.heldout_controls_in_train = heldout_controls_in_train
        self.on_missing_perturbation = on_missing_perturbation
        self.on_missing_features = on_missing_features
        self.val_subsample_fraction = val_subsample_fraction
        self.drop_missing_labels = drop_missing_labels
        self.yield_controls = yield_controls
        self.drop_last = drop_last
        self.exclude_self = exclude_self
        self.cache_control_pairs = cache_control_pairs
        self.downsample_cells = downsample_cells
        self.downsample = downsample
        self.pad_from = pad_from
        self.val_from_test = val_from_test
        self.additional_obs = additional_obs
        self.dtype = dtype
        self.data_loading = data_loading
        self.stream_chunk_size = stream_chunk_size
        self.stream_buffer_chunks = stream_buffer_chunks
        self.stream_max_controls = stream_max_controls
        self.device = device
        self.seed = seed
        self.progress = progress

    # ------------------------------------------------------------------ configuration
    def _columns(self) -> ColumnMap:
        return ColumnMap.build(pert_col=self.pert_col, cell_type_key=self.cell_type_key,
                               batch_col=self.batch_col, control_pert=self.control_pert,
                               embed_key=self.embed_key, output_space=self.output_space,
                               gene_name_col=self.gene_name_col)

    def _resolve_preset(self, n_train_cells: int) -> str:
        """``preset="auto"``: ``small`` below :data:`AUTO_SMALL_MAX_CELLS` training cells, else
        ``state_sm``."""
        if self.preset != "auto":
            return self.preset
        return AUTO_PRESETS[0] if n_train_cells < AUTO_SMALL_MAX_CELLS else AUTO_PRESETS[1]

    def _training_defaults(self, preset: str, n_train_cells: int, set_len: int) -> dict:
        """Values for the training settings left as None (see :data:`TRAINING_DEFAULTS`)."""
        d = dict(TRAINING_DEFAULTS.get(preset.split("@")[0], TRAINING_DEFAULTS["*"]))
        batch = int(self.batch_size if self.batch_size is not None else d["batch_size"])
        steps = d["max_steps"]
        if steps == "epochs":  # a fixed number of passes over the training cells
            accum = as_count("gradient_accumulation_steps", self.gradient_accumulation_steps)
            passes = d["passes"] * n_train_cells / (batch * accum * set_len)
            steps = int(min(d["max_steps_cap"], max(d["min_steps"], round(passes))))
        steps = int(self.max_steps if self.max_steps is not None else steps)
        every = min(AUTO_VAL_FREQ, max(steps // 10, 1))
        return {"batch_size": batch, "max_steps": steps,
                "val_freq": int(self.val_freq if self.val_freq is not None else every),
                "lr": float(self.lr if self.lr is not None else d["lr"]),
                "weight_averaging": (d["weight_averaging"] if self.weight_averaging == "auto"
                                     else self.weight_averaging),
                "pairing": self._param_pairing(), "yield_controls": bool(self.yield_controls)}

    def _seed(self, seed: int | None) -> int:
        """A prediction's seed: as given, else the estimator's."""
        return as_seed(self.seed if seed is None else seed)

    def _needs_batch(self, basal_pool: str | None) -> bool:
        """Whether predicting needs the input's batch labels (a batch encoder, or basal cells
        drawn within the batch: ``basal_pool``, default the training pairing)."""
        return bool(self.network_config_.batch_encoder) or (
            basal_pool or self._pairing()) == "batch"

    def _input_batches(self, adata: ad.AnnData, batch_col: str | None, pool_mode: str,
                       unknown_batch: str) -> np.ndarray:
        """Each input cell's batch label, where pairing or the batch encoder needs one. Without
        a batch column, a batch-encoder model that does not pair by batch takes the
        ``unknown_batch`` embedding ('first' / 'mean') for every cell, or says what it needs."""
        if (self.network_config_.batch_encoder and pool_mode != "batch"
                and (batch_col is None or batch_col not in adata.obs.columns)):
            if unknown_batch == "error":
                raise DataError(
                    "the model has a batch encoder, which takes each cell's batch, and the input "
                    + (f"has no obs column '{batch_col}'" if batch_col else "names no batch column")
                    + f".{did_you_mean(batch_col or 'batch', map(str, adata.obs.columns))} Pass "
                    "batch_col=<column>, or unknown_batch='mean' (the mean embedding of the "
                    "trained batches) or 'first' to predict without batches.")
            say(f"no batch column in the input: every cell gets the {unknown_batch} batch "
                "embedding (unknown_batch).")
            return np.full(adata.n_obs, "\x00", dtype=object)  # (in no vocabulary)
        return pairing_batches(adata, batch_col, self._needs_batch(pool_mode))

    def _warn_size(self, preset: str, n_params: int, n_train: int) -> None:
        """Fit's advice when the network is large for the training cells (not for the small
        presets, nor when fine-tuning)."""
        if (n_params > 1000 * n_train and preset.split("@")[0] not in ("tiny", "small")
                and not self._fine_tunes):
            warn(
                f"the {preset!r} network has {n_params / 1e6:.1f}M parameters for {n_train:,} "
                f"training cells: on data this size it trains slowly and tends to do no better "
                "than the baselines. preset='small' (model=small), what preset='auto' picks "
                f"below {AUTO_SMALL_MAX_CELLS:,} training cells, is made for it.", UserWarning)

    def _warn_decoder_settings(self, prepared: PreparedData, net_cfg: NetworkConfig,
                               preset: str) -> None:
        """Gene-space targets without a gene decoder, and decoder settings that have no effect
        (said by ``fit`` and by the command line's dry run)."""
        columns = prepared.columns
        cli = on_command_line() is not None  # (tx train: its keys, not Python's arguments)
        if prepared.gene_dim and not net_cfg.gene_dim:
            warn(
                f"output_space={columns.output_space!r} asks for gene-space predictions, but "
                f"the {preset!r} architecture has no gene decoder (gene_decoder_bool=False): "
                f"predictions stay in the space of obsm['{columns.embed_key}']. For genes, use "
                + ("model.kwargs.gene_decoder_bool=true (or a preset with a decoder, e.g. "
                   "model=state); for embeddings only, data.kwargs.output_space=embedding."
                   if cli else
                   "model_kwargs={'gene_decoder_bool': True} (or a preset with a decoder, e.g. "
                   "'state'); for embeddings only, output_space='embedding'."), UserWarning)
        # (keys given at the preset's own values, e.g. by a run's config.yaml, change nothing)
        own = resolve_architecture(preset)
        given = self.model_kwargs or {}
        idle = [k for k in ("gene_decoder_bool", "decoder_hidden_dims", "decoder_dropout")
                if k in given and json.dumps(given[k], default=str)
                != json.dumps(own.get(k), default=str)]  # (lists and tuples alike)
        if idle and not prepared.gene_dim:
            named = (", ".join(f"model.kwargs.{k}" for k in idle) if cli
                     else f"model_kwargs {', '.join(idle)}")
            warn(
                f"{named} have no effect here: a gene decoder is built only "
                "when the data have gene-space targets besides the network's own output (an "
                "input embedding other than X_hvg with output_space 'gene' or 'all', or "
                f"X_hvg with 'all'; here embed_key={columns.embed_key!r}, output_space="
                f"{columns.output_space!r}).", UserWarning)

    def _pairing(self) -> str:
        """The control pairing the model trained with (predictions pair as in training, whatever
        ``set_params`` changed since); models saved before it was recorded: the parameters'."""
        return getattr(self, "train_settings_", {}).get("pairing") or self._param_pairing()

    def _param_pairing(self) -> str:
        """Control pairing of the parameters: ``auto`` = ``batch`` when ``batch_col`` is set,
        else ``random``."""
        if self.basal_mapping_strategy == "auto":
            return "batch" if self.batch_col else "random"
        return self.basal_mapping_strategy

    def _train_config(self, settings: dict) -> TrainConfig:
        return TrainConfig(
            max_steps=settings["max_steps"], lr=settings["lr"], optimizer=self.optimizer,
            weight_decay=float(self.weight_decay), lr_schedule=self.lr_schedule,
            weight_averaging=settings.get("weight_averaging", "none"),
            averaging_start=self.averaging_start,
            warmup_steps=self.warmup_steps, gradient_clip_val=self.gradient_clip_val,
            gradient_accumulation_steps=self.gradient_accumulation_steps, loss=self.loss,
            **split_loss_kwargs(self.loss_kwargs),
            val_freq=settings["val_freq"], ckpt_every_n_steps=self.ckpt_every_n_steps,
            log_every_n_steps=self.log_every_n_steps,
            keep_last_n=self.keep_last_n, early_stopping_patience=self.early_stopping_patience,
            precision=self.precision, matmul_precision=self.matmul_precision,
            compile=bool(self.compile), compile_mode=self.compile_mode,
            data_on_device=self.data_on_device, seed=int(self.seed),
            progress=bool(self.progress),
        )

    def _architecture(self, preset: str) -> dict:
        arch = resolve_architecture(preset, self.model_kwargs)
        if self.cell_set_len is not None:
            arch["cell_set_len"] = int(self.cell_set_len)
        if arch["batch_encoder"] and self.batch_col is None:
            raise ConfigError("model_kwargs batch_encoder=True needs batch_col=<the obs column "
                              "holding the batch>.")
        if self.basal_mapping_strategy == "batch" and self.batch_col is None:
            raise ConfigError("basal_mapping_strategy='batch' needs batch_col=<the obs column "
                              "holding the batch>.")
        if self.basal_mapping_strategy not in ("auto", "random", "batch"):
            raise ConfigError(f"basal_mapping_strategy={self.basal_mapping_strategy!r} is invalid; "
                              "expected 'auto', 'random' or 'batch'.")
        return arch

    def _data_options(self) -> dict[str, Any]:
        """How the split data are built (the same for fit, attach_data and tx split)."""
        return dict(heldout_controls_in_train=self.heldout_controls_in_train,
                    counts_key=self.counts_key, allow_counts=bool(self.allow_counts),
                    on_missing_perturbation=self.on_missing_perturbation,
                    on_missing_features=self.on_missing_features,
                    val_subsample_fraction=self.val_subsample_fraction,
                    drop_missing_labels=bool(self.drop_missing_labels),
                    yield_controls=self.yield_controls, dtype=self.dtype)

    def _additional_obs(self, more: Sequence[str] | None = None) -> list[str]:
        """The ``additional_obs`` column names, then ``more`` (a call's own) not among them,
        checked (lists of distinct, unreserved names)."""
        out: list[str] = []
        for cols in (self.additional_obs, more):
            if cols is None:
                continue
            if isinstance(cols, str) or not all(isinstance(c, str) for c in cols):
                raise ConfigError(f"additional_obs={cols!r} must be a list of obs column names"
                                  + (f" (write [{cols!r}])." if isinstance(cols, str) else "."))
            cols = list(cols)
            dup = sorted({c for c in cols if cols.count(c) > 1})
            reserved = {self.pert_col, self.cell_type_key, self.batch_col,
                        "pert_cell_barcode", "ctrl_cell_barcode", "n_cells"} & set(cols)
            if dup or reserved:
                raise ConfigError(f"additional_obs={cols!r}: "
                                  + (f"{', '.join(map(repr, dup))} listed twice" if dup else
                                     f"{', '.join(map(repr, sorted(reserved)))} is written to "
                                     "the outputs already (a label or barcode column)") + ".")
            out += [c for c in cols if c not in out]
        return out

    def _thinning(self, prepared: PreparedData) -> ReadDepthThinning | None:
        """The read-depth downsampling of training batches (``downsample``), or None."""
        rate = check_read_depth(self.downsample)
        if rate is None:
            return None
        if self.embed_key is None:
            return ReadDepthThinning(rate, bool(prepared.is_log1p), ("basal", "target"))
        return ReadDepthThinning(rate, prepared.x_is_log1p(), ("counts",))  # (see _check_params)

    def _check_params(self, check_device: bool = True) -> None:
        """Every option error that needs no data (fit calls it before reading anything);
        ``check_device``: also that the requested device exists here."""
        if self.weight_averaging not in ("auto", "none", "uniform"):
            raise ConfigError(f"weight_averaging={self.weight_averaging!r} is invalid; expected "
                              "'auto', 'none' or 'uniform'.")
        averaging = "none" if self.weight_averaging == "auto" else self.weight_averaging
        as_seed(self.seed)
        for name, example in (("model_kwargs", "{'hidden_dim': 8}"),
                              ("loss_kwargs", "{'blur': 0.05}")):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name}={value!r} is invalid; it must be a dict (e.g. "
                                  f"{name}={example}) or None.")
        for name, example in (("lr", "1e-3"), ("weight_decay", "1e-4"),
                              ("gradient_clip_val", "10"), ("averaging_start", "0.5"),
                              ("val_subsample_fraction", "0.5")):
            check_number(name, getattr(self, name), example,
                         optional=name in ("lr", "gradient_clip_val"))
        self._columns()  # (the column options: e.g. two naming the same column)
        if self.on_missing_features not in ("zeros", "error"):
            raise ConfigError(f"on_missing_features={self.on_missing_features!r} is invalid; "
                              "expected 'zeros' or 'error'.")
        if not 0.0 < float(self.val_subsample_fraction) <= 1.0:
            raise ConfigError(f"val_subsample_fraction={self.val_subsample_fraction!r} must be "
                              "in (0, 1].")
        for name in ("batch_size", "cell_set_len", "max_steps", "val_freq"):
            as_count(name, getattr(self, name), optional=True)
        as_count("downsample_cells", self.downsample_cells, optional=True)
        check_sampler_options("random", 1, 1, pad_from=self.pad_from)
        self._additional_obs()
        for name in ("drop_last", "exclude_self", "val_from_test", "yield_controls",
                     "heldout_controls_in_train", "train_pert_skip", "progress", "allow_counts",
                     "cache_control_pairs"):
            check_flag(name, getattr(self, name))
        if self.cache_control_pairs and self.data_loading == "stream":
            raise ConfigError("cache_control_pairs=True needs the cells in memory "
                              "(data_loading='memory'): a streamed epoch reads its controls "
                              "from a reservoir.")
        # an embedding input reads X only as the gene-space targets of output 'all' (or of
        # 'gene' with counts_key='X')
        reads_x = self.embed_key is None or (
            self.output_space != "embedding"
            and not (self.output_space == "gene" and self.embed_key == "X_hvg")
            and counts_source(self.output_space, self.counts_key) is None)
        if check_read_depth(self.downsample) is not None and not reads_x:
            raise ConfigError(
                f"downsample={self.downsample!r} thins counts read from X, but with "
                f"embed_key={self.embed_key!r}, output_space={self.output_space!r} and "
                f"counts_key={self.counts_key!r} nothing is read from X. Use it with X as the "
                "input (embed_key=None) or as the gene-space target (output_space='all', "
                "counts_key unset or 'X').")
        idle = self.embed_key is None or self.output_space == "embedding" or (
            self.embed_key == "X_hvg" and self.output_space == "gene")
        if self.counts_key is not None and idle:
            warn(f"counts_key={self.counts_key!r} has no effect: it chooses the "
                 "gene-space targets when the input is an obsm matrix (embed_key) and "
                 "the output space is 'all', or an embedding other than X_hvg with "
                 "output 'gene'.", UserWarning)
        # architecture errors (preset name, model_kwargs, pairing) before reading data; "auto"
        # picks its preset from the data: an error here is one that every candidate would raise
        candidates = AUTO_PRESETS if self.preset == "auto" else (self.preset,)
        errors = []
        with warnings.catch_warnings():  # fit gives the warnings once, for the preset it uses
            warnings.simplefilter("ignore")
            for preset in candidates:
                try:
                    self._architecture(preset)
                except ConfigError as exc:
                    errors.append(exc)
        if len(errors) == len(candidates):
            raise errors[0]
        probe = {"max_steps": 1, "lr": 0.0, "weight_averaging": averaging, "val_freq": 1}
        cfg = self._train_config(probe)
        get_loss(cfg.loss, **cfg.loss_options)  # loss option errors before reading data
        if self.lr is not None:
            self._train_config({**probe, "lr": self.lr})
        if check_device:
            resolve_device(self.device)

    # ------------------------------------------------------------------ fit
    def fit(self, adata: ad.AnnData | dict[str, ad.AnnData] | None = None,
            split_config: SplitConfig | dict | str | Path | None = None, *,
            dataset_name: str | None = None, output_dir: str | Path | None = None,
            resume_from: str | Path | None = None,
            force_resume: bool = False) -> StateTransitionModel:
        """Train on ``adata`` (or the split spec's files when None) and return ``self``.

        Parameters
        ----------
        adata
            One AnnData (the dataset the spec refers to, or ``dataset_name``), a dict name →
            AnnData, or None to read the spec's ``[datasets]`` files.
        split_config
            Assigns cells to train/val/test: a :class:`SplitConfig`, a dict, a TOML path or
            string; without it every cell trains.
        dataset_name
            The spec's name for a single ``adata`` when the spec uses several.
        output_dir
            Receives checkpoints, ``metrics.csv``, the vocabularies and the run files (a run
            folder :meth:`load_run` reads); None writes nothing.
        resume_from
            A run's ``last.ckpt``: training continues exactly where it stopped (same data and
            split spec).
        force_resume
            Continue even though the data or settings changed since the checkpoint.

        Returns
        -------
        StateTransitionModel
            ``self``, fitted. A fit that fails or is interrupted leaves the estimator as it was
            (the checkpoints written so far stay in ``output_dir``). Randomness comes from
            ``seed`` alone; torch's global random state (the CPU's, and that of the GPU it
            trains on) is left as it was.
        """
        with torch.random.fork_rng(devices=self._cuda_devices()):
            return self._fit(adata, split_config, dataset_name=dataset_name,
                             output_dir=output_dir, resume_from=resume_from,
                             force_resume=force_resume, run=None)

    def _fit_run(self, run: ManagedRun, *args: Any, **kwargs: Any) -> StateTransitionModel:
        """``fit`` into the run folder ``tx train`` prepared (``run``)."""
        with torch.random.fork_rng(devices=self._cuda_devices()):
            return self._fit(*args, run=run, **kwargs)

    def _prepare(self, adata: ad.AnnData | dict[str, ad.AnnData] | None,
                 split_config: SplitConfig | dict | str | Path | None, columns: ColumnMap,
                 dataset_name: str | None = None) -> PreparedData:
        """The split data a fit trains on (``columns``: :meth:`_columns`; the training split
        streamed with ``data_loading="stream"``); the command line's dry run reads them alike."""
        stream = self.data_loading == "stream"
        prepared = preparer(self.stream_chunk_size if stream else None)(
            adata, split_config, columns, dataset_name=dataset_name,
            pert_features=self.pert_features,
            **self._data_options(),
        )
        extra_obs = self._additional_obs()
        for f in prepared.files if extra_obs else ():  # a missing column: an error now
            f.obs_columns(extra_obs)
        return prepared

    def _plan(self, prepared: PreparedData) -> FitPlan:
        """What ``fit`` trains on ``prepared`` (:meth:`_prepare`): the preset, architecture,
        training settings and network configuration. Used by ``fit`` and by the command line's
        dry run, so that the two plan a run alike; it reads no more data and writes nothing
        (the architecture may warn, as ``model_kwargs`` are applied)."""
        train = prepared.splits["train"]
        n_train = int(train.is_target.sum())
        n_used = n_train  # (downsample_cells: at most that many cells of a group train)
        if self.downsample_cells is not None:
            key = train.context[train.is_target] * (int(train.pert.max()) + 1) + train.pert[
                train.is_target]
            n_used = int(np.minimum(np.unique(key, return_counts=True)[1],
                                    self.downsample_cells).sum())
        preset = self._resolve_preset(n_train)
        arch = self._architecture(preset)
        settings = self._training_defaults(preset, n_used, int(arch["cell_set_len"]))
        return FitPlan(n_train=n_train, n_used=n_used, preset=preset, arch=arch,
                       settings=settings, net_cfg=network_config_for(arch, prepared))

    def _cuda_devices(self) -> list[int]:
        """The CUDA device a fit trains on (its random state is restored afterwards); none on
        the CPU."""
        if not torch.cuda.is_available():
            return []
        try:
            dev = resolve_device(self.device, env_local_rank())
        except ConfigError:
            return []  # (the device error comes from the parameter checks)
        if dev.type != "cuda":
            return []
        return [dev.index if dev.index is not None else torch.cuda.current_device()]

    def _fit(self, adata: ad.AnnData | dict[str, ad.AnnData] | None,
             split_config: SplitConfig | dict | str | Path | None, *, dataset_name: str | None,
             output_dir: str | Path | None, resume_from: str | Path | None,
             force_resume: bool, run: ManagedRun | None) -> StateTransitionModel:
        self._check_params()
        # torchrun: join/create the process group (None = one process, nothing distributed);
        # train sets are sharded across ranks, validation batches are dealt by the Trainer
        ddp = init_distributed(self.device)
        rank, world = (ddp.rank, ddp.world_size) if ddp is not None else (0, 1)
        out = Path(output_dir) if output_dir is not None else None
        if out is not None:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"output_dir {out} is a file; give a folder.")
            # (rank 0 looks: it alone writes, and may already be writing there; every rank
            # raises its finding, or the others would wait for it at a collective)
            foreign = (rank == 0 and out.is_dir() and any(out.iterdir())
                       and not looks_like_run(out))
            raise_together(ConfigError(f"output_dir {out} holds files that are not a statetx "
                                       "run; choose an empty or new folder (nothing was "
                                       "written).") if foreign else None)
            if resume_from is not None:
                ckpts = Path(resume_from).resolve().parent
                if ckpts != (out / "checkpoints").resolve() and has_checkpoints(out):
                    raise ConfigError(
                        f"output_dir {out} holds the checkpoints of another run: resuming "
                        f"{resume_from} there would mix two runs. Resume into the checkpoint's "
                        f"own run folder ({ckpts.parent}) or into an empty or new output_dir "
                        "(nothing was written).")
        columns = self._columns()
        stream = stream_settings(self.data_loading, self.stream_chunk_size,
                                 self.stream_buffer_chunks, self.stream_max_controls)
        prepared = self._prepare(adata, split_config, columns, dataset_name)
        plan = self._plan(prepared)
        preset, settings, set_len, net_cfg = plan.preset, plan.settings, plan.set_len, plan.net_cfg
        train_cfg = self._train_config(settings)
        verbose = self.progress and rank == 0
        if rank == 0:
            warn_training_scale(prepared)
        if verbose:
            say(f"preset {preset!r}, batch_size {settings['batch_size']}, max_steps "
                f"{settings['max_steps']}, lr {settings['lr']:g} ({plan.n_train:,} training cells"
                + (f", {plan.n_used:,} used: at most {self.downsample_cells:,} per group"
                     if self.downsample_cells is not None else "") + ")")
        vocab = prepared.vocab
        torch.default_generator.manual_seed(int(self.seed))  # (built on the CPU)
        network = StateTransitionNetwork(net_cfg)
        if verbose:
            print(describe(net_cfg, network))
        if rank == 0:
            self._warn_size(preset, network.num_parameters(), plan.n_train)
            self._warn_decoder_settings(prepared, net_cfg, preset)
        _warn_unused_loss_options(self.loss, self.loss_kwargs, network.gene_decoder is not None)
        val_name = "val" if "val" in prepared.splits else (
            "test" if self.val_from_test and "test" in prepared.splits else None)
        # a validation split of untrained perturbations only (one-hot) would choose best.ckpt
        # and stop early on a loss that training cannot move: not validated on
        blind = val_name is not None and _untrained_only(prepared, val_name)
        if rank == 0:
            _warn_held_out_perturbations(prepared, val_name if blind else None)
        if blind:
            val_name = None
        if network.pert_bias is not None:
            start_at_mean_response(network, prepared.splits["train"], vocab)
            if not self.train_pert_skip:  # keep the mean-response skip fixed during training
                for layer in (network.pert_bias, network.pert_mean_scale):
                    if layer is not None:
                        layer.weight.requires_grad_(False)
        thinning = self._thinning(prepared)
        if verbose and val_name == "test":
            say("no validation split: validating on the test split (val_from_test=True;"
                " the best checkpoint is then chosen on test data).")
        elif verbose and val_name is None and not blind:
            say("no validation split: validation is skipped and no best checkpoint is "
                "written (the test split is never used for validation"
                + (", and there is none" if self.val_from_test else "") + ").")
        if rank == 0:
            _warn_idle_options(train_cfg, val_name is not None, blind)
        previous = self._learned_state()
        # a fresh run (not resumed; the CLI prepares its own folder) starts in an empty folder;
        # an earlier run there is set aside until this one has written a checkpoint
        fresh = out is not None and resume_from is None and rank == 0 and run is None
        if fresh:
            existed, aside = out.is_dir(), set_aside(out)
        # a job scheduler's SIGTERM unwinds like Ctrl-C, so that the earlier run comes back
        restore_sigterm = sigterm_unwinds() if fresh and aside is not None else None
        samplers: dict[str, Any] = {}  # (closed whatever happens: streamed ones hold files)
        try:  # a failed fit leaves the estimator as it was (fitted or not)
            samplers.update({
                role: make_sampler(split, vocab, set_len, settings["batch_size"], stream=stream,
                                   seed=int(self.seed) + i, pairing=settings["pairing"],
                                   exclude_self=bool(self.exclude_self),
                                   **({"fixed_pairs": True} if self.cache_control_pairs else {}),
                                   downsample_cells=self.downsample_cells, pad_from=self.pad_from,
                                   thinning=thinning,
                                   # validation uses every set (drop_last shapes training batches)
                                   **({"rank": rank, "world_size": world,
                                       "drop_last": bool(self.drop_last)}
                                      if role == "train" else {}))
                for i, (name, split) in enumerate(prepared.splits.items())
                for role in [{"train": "train", val_name: "val"}.get(name)] if role is not None
            })
            if stream is not None:  # (the streaming sampler warns about its own padding)
                if verbose:
                    say(samplers['train'].describe())
            elif rank == 0:
                _warn_padding(samplers["train"], settings["pairing"], self.basal_mapping_strategy)
            if rank == 0 and settings["pairing"] == "batch":
                _warn_unpaired_batches(prepared, self.basal_mapping_strategy)
            for k in previous:  # nothing of an earlier fit (or loaded run) survives a refit
                delattr(self, k)
            self._set_fitted(network, net_cfg, vocab, prepared, set_len)
            self.preset_, self.train_settings_ = preset, settings
            trainer = Trainer(network, samplers["train"], samplers.get("val"), train_cfg,
                              device=ddp.device if ddp is not None
                              else resolve_device(self.device), output_dir=out,
                              checkpoint_extra={"statetx_model": persist.metadata(self),
                                                **features_entry(vocab),
                                                "training_data": prepared.fingerprint()})
            if resume_from is not None:  # a refused resume writes nothing into the run
                trainer.check_resume(resume_from, force=bool(force_resume))
            if fresh and aside is not None:  # the earlier run goes once this one has a checkpoint
                trainer.on_first_checkpoint = lambda: settle_aside(out, aside, True, existed)
            else:  # the CLI's overwrite=true does the same with the run it set aside
                trainer.on_first_checkpoint = run and run.on_first_checkpoint
            if out is not None and rank == 0:
                write_run_files(self, out, prepared, split_config, run and run.config)
            if verbose:
                say(f"training on {trainer.device}, " + (
                    "bf16 autocast (precision bf16-mixed)" if trainer.amp else
                    f"fp32 (matmul_precision {train_cfg.matmul_precision})")
                    + (f"; data parallel over {world} processes: {world} x batch_size "
                       f"{settings['batch_size']} = {world * settings['batch_size']} sets per "
                       "step" if world > 1 else ""))
            history = trainer.fit(resume_from=resume_from)
        except BaseException:
            self._restore_learned(previous)
            if fresh:
                settle_aside(out, aside, has_checkpoints(out), existed)
            raise
        finally:
            if restore_sigterm is not None:
                restore_sigterm()
            for sampler in samplers.values():  # (streamed: its reader thread and open files)
                if hasattr(sampler, "close"):
                    sampler.close()
        if fresh:
            settle_aside(out, aside, True, existed)
        self.training_time_ = trainer.elapsed()  # (a resumed run's earlier steps included)
        self.history_ = history_frame(history)
        self.best_step_ = trainer.state.best_step
        if out is not None:
            self.run_dir_ = out
            if rank == 0:  # the fit record, for load_run (the CLI adds its own timing)
                finish_run(out, self, self.training_time_)
        return self

    def _check_normalisation(self, adata: ad.AnnData, x: np.ndarray, ctx: np.ndarray,
                             is_ctrl: np.ndarray) -> None:
        """Warn when the input was normalised to other counts per cell than the training data
        (its log1p values are then shifted against the model's): from the statetx.pp records
        when both have one, else from the values — the control cells of each cell type the
        model trained on, more than 2× off in the median counts per cell their values stand
        for over the model's genes (``expression_depth_``)."""
        mine, theirs = getattr(self, "target_sum_", None), recorded_target_sum(adata)
        if mine is None or theirs is None:
            # (a depth of 0, recorded by older versions, has nothing to compare with)
            trained = {ct: d for ct, d in (getattr(self, "expression_depth_", None)
                                           or {}).items() if d > 0}
            depths = control_depths(x, ctx, is_ctrl & np.isin(ctx, list(trained)))
            ratios = {ct: d / trained[ct] for ct, d in depths.items()}
            off = {ct: r for ct, r in ratios.items() if not 0.5 <= r <= 2}
            if off:
                ratio = float(np.median(list(off.values())))
                warn(
                    f"the input's control cells of {preview(sorted(off))} stand for {ratio:.3g}x "
                    "the counts per cell of the training data's, over the model's "
                    f"{x.shape[1]:,} genes: the input looks normalised to another total (its "
                    f"values shifted by about {np.log(ratio):+.2f}), or many of the model's "
                    "genes are missing from it, so the predictions are off. Normalise it as the "
                    "training data (the same normalize_total target_sum, or "
                    "statetx.pp.preprocess_train's record).", UserWarning)
            return
        if abs(np.log(theirs / mine)) <= 0.1:  # (two files' median totals differ by a few %)
            return
        warn(
            f"the input was normalised to {theirs:,.6g} counts per cell (uns['statetx_preprocess'])"
            f" and the training data to {mine:,.6g}: its log1p values are on another scale "
            f"(expressed genes shifted by about log({theirs / mine:.3g}) = "
            f"{np.log(theirs / mine):+.2f}). Normalise it to the training data's total: "
            f"statetx.pp.preprocess_train(adata, target_sum={mine:g}) (tx preprocess_train "
            f"--target-sum {mine:g}).", UserWarning)

    def _vocab_with(self, pert_features: Any) -> Vocab:
        """The vocabulary extended by ``predict(pert_features=...)``'s new vectors (said)."""
        if pert_features is None:
            return self.vocab_
        feats = (load_pert_features(pert_features) if isinstance(pert_features, (str, Path))
                 else pert_features)
        trained = getattr(self, "trained_perturbations_", None)
        if trained is None:  # (an imported model: only vectors left at zeros may be given)
            v = self.vocab_
            trained = [n for n, row in zip(v.perturbations, v.pert_features) if row.any()]
        vocab, given = self.vocab_.with_vectors(feats, fixed=[*trained, self.vocab_.control_pert])
        if given:
            say(f"feature vectors given for {len(given)} perturbation(s) without "
                f"training cells: {preview(given)}")
        return vocab

    def _route_untrained(self, codes: np.ndarray, where: str, vocab: Vocab | None = None,
                         mode: str = "control") -> tuple[np.ndarray, list[str]]:
        """``codes`` (of ``vocab``, default the model's) with the perturbations that had no
        training cells warned about, and those perturbations' names. One-hot ones are routed
        to the control's code (``mode`` "control": their never-trained embedding would add a
        random effect; not when the control's did not train either, ``yield_controls=False``)
        or kept ("as_is", the reference); with features, those whose vector is zeros are
        predicted as the control by the network itself."""
        if mode not in UNTRAINED_MODES:
            raise ConfigError(f"untrained_perturbation={mode!r} is invalid; expected one of "
                              f"{', '.join(map(repr, UNTRAINED_MODES))}.")
        trained = getattr(self, "trained_perturbations_", None)
        ctrl_trained = getattr(self, "train_settings_", {}).get("yield_controls",
                                                                self.yield_controls)
        v = vocab or self.vocab_
        if trained is None:
            return codes, []
        seen = np.unique(codes[codes >= 0])
        names = np.asarray(v.perturbations, dtype=object)[seen]
        if v.pert_features is not None:  # (zero vectors: what a missing feature vector gets)
            names = names[~v.pert_features[seen].any(axis=1)]
        new = sorted(set(names) - set(trained) - {v.control_pert})
        if not new:
            return codes, []
        if v.pert_features is not None:
            why = ("They have no feature vector (zero vectors), so the network sees no "
                   "perturbation for them. Give their vectors with pert_features=... "
                   "(tx predict / tx infer --pert-features).")
        elif mode == "control" and ctrl_trained:
            why = ("Their one-hot embedding was never trained, so they are predicted as the "
                   "control (no effect; untrained_perturbation='as_is', --untrained-perturbation "
                   "as_is on the command line, keeps the untrained embedding, as arc-state "
                   "does).")
        else:
            why = ("Their one-hot embedding was never trained (its random start)"
                   + ("" if ctrl_trained else ", nor was the control's (yield_controls="
                      "False: control cells were no training targets)")
                   + ", so their predicted effects are not learned from data.")
        if v.pert_features is None:
            why += (" Perturbation features (pert_features=..., e.g. gene embeddings) let a "
                    "model predict unseen perturbations.")
        warn(f"{len(new)} perturbation(s) of the {where} had no training cells: "
             f"{preview(new)}. {why}", UserWarning)
        if v.pert_features is not None or mode == "as_is" or not ctrl_trained:
            return codes, new
        index = {n: i for i, n in enumerate(v.perturbations)}
        out = codes.copy()
        out[np.isin(codes, [index[n] for n in new])] = index[v.control_pert]
        return out, new

    def _warn_held_out_batches(self, codes: np.ndarray, where: str) -> None:
        """Warn of the batches of ``codes`` (a split's cells) without training cells: the
        network reads their never-trained embedding rows as the trained batches' mean."""
        trained = getattr(self, "trained_batches_", None)
        if not self.network_config_.batch_encoder or trained is None:
            return
        held = ~np.isin(codes, self.vocab_.encode("batch", trained))
        if not held.any():
            return
        names = np.unique(np.asarray(self.vocab_.batches, dtype=object)[codes[held]])
        warn(f"{len(names)} batch(es) of the {where} had no training cells: {preview(names)}. "
             "Their batch embedding never trained (its random start), so their cells are "
             "predicted with the mean embedding of the trained batches.", UserWarning)

    def _set_fitted(self, network, net_cfg, vocab, prepared: PreparedData, set_len: int) -> None:
        self.network_ = network
        self.network_config_ = net_cfg
        self.vocab_ = vocab
        self.columns_ = prepared.columns
        self.var_names_ = list(prepared.feature_names)
        self.gene_names_ = None if prepared.gene_names is None else list(prepared.gene_names)
        self.cell_set_len_ = set_len
        self.is_log1p_ = bool(prepared.is_log1p)
        self.is_counts_ = prepared.is_counts
        self.split_summary_ = prepared.summary
        self.split_config_ = prepared.config
        sums = {f.target_sum for f in prepared.files}
        self.target_sum_ = sums.pop() if len(sums) == 1 else None
        train = prepared.splits["train"]
        self.expression_depth_ = (
            control_depths(train.X, np.asarray(vocab.cell_types, dtype=object)[train.cell_type],
                           train.is_control) if prepared.is_log1p
            and prepared.columns.embed_key in (None, "X_hvg") and isinstance(train, SplitData)
            else None)  # (a streamed split's matrix is not in memory)
        codes = _perturbed_codes(prepared.splits["train"])
        self.trained_perturbations_ = [vocab.perturbations[i] for i in codes]
        batches = np.unique(train.batch[train.is_target])  # (the embedding rows that train)
        self.trained_batches_ = ([vocab.batches[i] for i in batches] if net_cfg.batch_encoder
                                 else None)
        persist.mark_trained_batches(self)
        self.n_features_in_ = prepared.input_dim
        self._prepared = prepared

    # ------------------------------------------------------------------ fitted checks
    def _check_fitted(self) -> None:
        if not hasattr(self, "network_"):
            raise NotFittedError("This StateTransitionModel is not fitted yet. Call fit(...) or "
                                 "load a saved model first.")

    @property
    def _expression_output(self) -> bool:
        """Whether the main output (decoded genes, else the network's prediction) is expression
        (clipped, named by genes) rather than an embedding."""
        return self.columns_.output_space != "embedding" and (
            self.columns_.embed_key in (None, "X_hvg")
            or getattr(self.network_, "gene_decoder", None) is not None)

    @property
    def _output_scale(self) -> str:
        """What the output's X holds (recorded in ``uns["statetx"]["scale"]``, read by
        :func:`statetx.evaluate`): ``log1p`` or ``counts`` expression, or an ``embedding``."""
        return output_scale(self._expression_output, self.is_log1p_)

    # ------------------------------------------------------------------ predict
    def predict_sets(self, basal, perturbation, batch=None, *,
                     matmul_precision: str = "highest") -> np.ndarray:
        """Apply the network (eval mode, no sampling) to given sets.

        ``basal``: ``[B, S, D_in]`` or ``[S, D_in]`` (one set of any length). ``perturbation``:
        names (one per set or ``[B, S]`` per cell), or vectors ``[B, P]`` / ``[B, S, P]``.
        ``batch``: names or indices (per set or per cell; models with a batch encoder).
        ``matmul_precision``: as in :meth:`predict`.
        Returns ``[B, S, D_out]`` (``[S, D_out]`` for a single set).
        """
        self._check_fitted()
        check_matmul_precision(matmul_precision)
        x = torch.as_tensor(np.asarray(basal, dtype=np.float32))
        single = x.ndim == 2
        if single:
            x = x[None]
        if x.ndim != 3 or x.shape[-1] != self.n_features_in_:
            raise DataError(f"basal must have shape [B, S, {self.n_features_in_}] or "
                            f"[S, {self.n_features_in_}], got {tuple(np.shape(basal))}.")
        b, s, _ = x.shape
        pert = self._pert_tensor(perturbation, b, s, single)
        bidx = self._batch_tensor(batch, b, s, single)
        net = self.network_
        dev = next(net.parameters()).device
        net.eval()
        with torch.no_grad(), matmul_precision_scope(matmul_precision):
            out = net(x.to(dev), pert.to(dev), batch_index=bidx.to(dev))
        pred = out.pred.float().cpu().numpy()
        return pred[0] if single else pred

    def _pert_tensor(self, perturbation, b: int, s: int, single: bool) -> torch.Tensor:
        arr = np.asarray(perturbation)
        if arr.dtype.kind in "USO":
            names = np.atleast_1d(arr).astype(str)
            codes = torch.from_numpy(self.vocab_.encode("pert", names.reshape(-1)))
            table = pert_table(self.vocab_)
            if names.ndim == 1 and len(codes) == b:  # one per set
                return pert_inputs(table, codes)
            vec = table[codes] if table is not None else torch.nn.functional.one_hot(
                codes, len(self.vocab_.perturbations)).float()
            return vec.reshape(b, s, -1)
        vec = torch.as_tensor(arr, dtype=torch.float32)
        if single and (vec.ndim == 1 or (vec.ndim == 2 and len(vec) == s > 1)):
            vec = vec[None]  # one set: one vector [P], or one per cell [S, P]
        return vec

    def _batch_tensor(self, batch, b: int, s: int, single: bool) -> torch.Tensor:
        if batch is None:
            if self.network_config_.batch_encoder:
                raise DataError("this model has a batch encoder: pass batch= (names or indices).")
            return torch.zeros(b, s, dtype=torch.long)
        arr = np.atleast_1d(np.asarray(batch))
        if arr.dtype.kind in "USO":
            arr = self.vocab_.encode("batch", arr.reshape(-1).astype(str)).reshape(arr.shape)
        t = torch.as_tensor(arr.astype(np.int64))
        if t.ndim == 1 and not (single and t.numel() == s and s != 1):
            t = t[:, None].expand(b, s)
        return t.reshape(b, s)

    def predict(self, adata: ad.AnnData, *, pert_col: str | None = None,
                cell_type_col: str | bool | None = None, batch_col: str | None = None,
                control_pert: str | None = None, seed: int | None = None,
                cell_type_key: str | bool | None = None,
                set_len: int | None = None, windows: str = "balanced",
                basal_pool: str | None = None, basal_fallback: str = "error",
                basal: str = "sampled",
                unknown_perturbation: str = "error", unknown_batch: str = "error",
                untrained_perturbation: str = "control", predict_controls: bool = True,
                all_perts: bool = False,
                n_cells_per_pert: int | Mapping[str, int] | None = None,
                perturbations: Sequence[str] | None = None,
                min_cells: int | None = None, max_cells: int | None = None,
                clip: Any = "auto", missing_genes: str = "error",
                gene_name_col: str | bool | None = None,
                pert_features: str | Path | Mapping[str, Any] | None = None,
                matmul_precision: str = "highest", sets_per_pass: int = 64,
                layout: str = "statetx", keep_input: bool = False,
                inplace: bool = False) -> ad.AnnData | None:
        """Predict the perturbed state of the cells of ``adata``.

        Each cell carries a perturbation label and a context (cell type); its basal state is a
        control cell of the same context drawn with ``seed`` (and of the same batch when the
        model was trained with batch pairing). Returns a **new** AnnData with the input's obs
        (plus ``statetx_ctrl_barcode`` and ``statetx_set``), predictions in X (decoded genes
        when the model has a gene decoder; the latent output then in
        ``obsm['<embed_key>_pred']``), and the model's gene names as var.

        Parameters
        ----------
        adata
            Cells on the training scale (log1p expression, or the training ``embed_key``),
            controls included; genes are matched by name.
        pert_col, cell_type_col, batch_col
            The input's obs columns (default: the training ones). Without a cell-type column,
            a model trained on one context treats all cells as that context, and
            ``basal_pool="all"`` makes all cells one context; ``cell_type_col=False`` does so
            whatever the input holds (controls of any cell type as basal cells).
        cell_type_key
            Another name for ``cell_type_col`` (the one the estimator takes).
        control_pert
            The input's control label (default: the model's); another label is read as the
            model's control.
        seed
            Seeds the basal draws (and clones), per (context, perturbation) group (default: the
            estimator's ``seed``, as the baselines do). The draws follow the cells' order within
            a group: the same cells in another order get other controls and sets (the same
            distribution; single cells differ, and group means by the sampling noise of the
            controls).
        set_len, windows
            Cells per set (default: the model's ``cell_set_len``) and how a group is cut into
            sets: ``"balanced"`` (⌈n/S⌉ sets of nearly equal size) or ``"reference"`` (chunks of
            S and a remainder, as arc-state).
        basal_pool, basal_fallback
            Where basal cells come from: ``"cell_type"``, ``"batch"`` (same cell type and
            batch, else the cell type, said; every cell then needs a label in ``batch_col``) or
            ``"all"`` (default: as in training); and, for a context without control cells,
            ``"error"`` (default) or ``"all_controls"``.
        basal
            ``"sampled"`` (default, the reference) draws each cell's basal state from the
            controls as above; ``"self"`` predicts every cell from its own expression ("these
            cells, perturbed": relabel control cells with the perturbation to apply) and needs
            no control cells; virtual cells (``all_perts``) start from the control they clone,
            every control once per perturbation unless ``n_cells_per_pert`` says otherwise.
        unknown_perturbation, unknown_batch
            Labels outside the training vocabulary: ``"error"`` (default, listing them),
            ``"control"`` / ``"zeros"`` for perturbations; ``"first"`` (the first trained
            batch) / ``"mean"`` (the mean embedding of the trained batches) for batches of a
            model with a batch encoder. Batches in the vocabulary without training cells (e.g.
            held out as val / test) count as unknown: their embedding rows never trained.
        untrained_perturbation
            Known perturbations that had no training cells (e.g. held out), with one-hot
            perturbations: ``"control"`` (default) predicts them as the control, since their
            never-trained embedding would add a random effect; ``"as_is"`` uses that embedding
            (arc-state's behaviour). Warned either way.
        predict_controls
            False copies the control cells into the output instead of predicting them (with a
            gene decoder: from the input's matrix of the decoder's genes; left out, with a
            warning, when the input lacks them); they get ``statetx_set`` -1.
        all_perts, n_cells_per_pert, perturbations
            ``all_perts=True`` also simulates every known perturbation (or those of
            ``perturbations``) in every context from ``n_cells_per_pert`` control clones (a
            number, or one per perturbation; default: as many as the context has controls),
            and keeps the input's ``uns``; see also :meth:`simulate`.
        min_cells, max_cells
            Every (context, perturbation) group but the control's is cloned up to / subsampled
            down to that many cells (seeded; clones follow the input's cells).
        clip
            ``"auto"`` (default: [0, 14] for log1p expression, ≥ 0 for count-scale outputs,
            nothing for embeddings), None, or a ``(low, high)`` pair.
        missing_genes
            Model genes absent from the input: ``"error"`` (default, listing them) or ``"zero"``.
        gene_name_col
            The input's var column holding gene names (e.g. symbols next to Ensembl IDs), if it
            differs from training's (default: the training ``gene_name_col``); False reads the
            input's ``var_names``.
        pert_features
            Models trained with perturbation features: vectors (a name → vector mapping, or a
            feature file) for perturbations without training cells, e.g. the embeddings of
            genes outside the training feature table (or given zeros there); with
            ``all_perts``, they are simulated too. Perturbations with training cells keep their
            vectors (giving another is an error).
        matmul_precision
            The network runs in full fp32 (``"highest"``, default, as the reference predicts)
            whatever the global setting; ``"medium"`` lets CPUs with AMX run its products in
            bf16 (``state_sm``: ~1.6x the cells/s on 2 cores, outputs within ~0.5 % RMS) and
            GPUs in TF32 (``"high"`` too).
        sets_per_pass
            Sets per forward pass (memory and speed; the outputs change only by float rounding,
            ~1e-7, as with other cells in the same input).
        layout, keep_input
            ``"arc"`` returns a copy of the input (its var, layers, obsm, uns) with the
            predictions where arc-state 0.11.1's ``tx infer`` writes them: the direct output in
            X (``embed_key`` None) or ``obsm[embed_key]``, or in ``obsm['X_state_pred']`` /
            ``obsm['<embed_key>_pred']`` when the width differs; decoded genes in
            ``obsm['X_hvg']`` (output space gene) or X (all). ``keep_input=True`` (default
            layout) carries the input's obsm and layers over when the output has its genes.
        inplace
            Write into ``adata`` itself where ``layout="arc"`` writes into its copy (its X or
            obsm, plus the obs columns and ``uns['statetx']``) and return None, as scanpy's
            ``inplace`` (``layout`` and ``keep_input`` do not apply); for predictions of the
            input's own cells (not with ``all_perts``, ``min_cells``, ``max_cells``) of an
            in-memory AnnData (a view becomes its own object, as anndata does on writes).
            When X receives the predictions, the input's expression kept beside it (every
            layer, e.g. ``counts``, and ``obsm['X_hvg']`` unless predicted into) is renamed
            ``<name>_input``, so that e.g. ``sc.pp.normalize_total(layer="counts")`` or an
            ``X_hvg`` model cannot take it for the prediction; a warning names it, and
            ``.raw`` / ``obsm['X_pca']``, which keep the measured values. Predictions written
            to obsm only (e.g. ``obsm['X_hvg']``) leave X and the layers the input's, as
            arc-state's layout does.
        """
        self._check_fitted()
        layout = check_predict_options(
            adata, inplace=inplace, layout=layout, all_perts=all_perts, min_cells=min_cells,
            max_cells=max_cells, n_cells_per_pert=n_cells_per_pert, perturbations=perturbations,
            set_len=set_len, sets_per_pass=sets_per_pass, matmul_precision=matmul_precision,
            choices={"basal_fallback": basal_fallback, "basal": basal,
                     "unknown_perturbation": unknown_perturbation,
                     "unknown_batch": unknown_batch,
                     "untrained_perturbation": untrained_perturbation})
        seed = self._seed(seed)
        vocab = self._vocab_with(pert_features)
        c = self.columns_
        own_basal = basal == "self"
        cols, batch_col, pool_mode, gene_col = self._predict_columns(
            pert_col, cell_type_col, cell_type_key, control_pert, batch_col, basal_pool,
            gene_name_col, own_basal)
        pert_col, ct_col = cols.pert_col, cols.cell_type_col

        # the input: features on the training scale, labels, batches
        x_in = input_matrix(adata, self.var_names_, c.embed_key, missing_genes, gene_col)
        expression_in = c.embed_key in (None, "X_hvg")
        if expression_in:
            src = c.embed_key if c.embed_key in adata.obsm else "X"  # (X_hvg falls back to X)
            check_input_scale(x_in, self.is_log1p_, f"input ({src})",
                              getattr(self, "target_sum_", None),
                              getattr(self, "is_counts_", None))
        pert, ctx, is_ctrl = input_labels(adata, pert_col, ct_col, cols.control,
                                          self.vocab_.cell_types, cols.cell_type_given,
                                          pool_mode == "all", need_controls=not own_basal)
        if expression_in:
            self._check_normalisation(adata, x_in, ctx, is_ctrl)
        _say_new_contexts(ctx, self.vocab_.cell_types)
        batch = self._input_batches(adata, batch_col, pool_mode, unknown_batch)
        ctx_all, batch_all = ctx, batch  # every input cell's (ctx, batch: of the output rows)
        control = c.control_pert  # the input's own control label reads as the model's
        if cols.control != control:
            pert = np.where(is_ctrl, control, pert).astype(object)

        # the output rows: the input's cells, virtual cells (all_perts), resized groups
        obs, src_rows, pert, ctx, batch = self._predict_rows(
            adata, pert, ctx, batch, is_ctrl, control, seed, pert_col, vocab, all_perts=all_perts,
            n_cells_per_pert=n_cells_per_pert, perturbations=perturbations,
            min_cells=min_cells, max_cells=max_cells, own_basal=own_basal,
            keep=(ct_col, batch_col))
        # predict_controls=False: control cells are copied, not predicted (decoded outputs: from
        # the input's matrix of the decoder's genes; left out when the input lacks it)
        as_is = np.zeros(len(pert), dtype=bool) if predict_controls else pert == control
        real_counts = None
        if as_is.any() and self.network_.gene_decoder is not None:
            try:
                real_counts = align_genes(adata[src_rows[as_is]], self.gene_names_,
                                          self._counts_source(), "error", gene_col)
            except DataError as err:
                warn("predict_controls=False: the control cells are left out of the "
                     f"output (they cannot be copied into the decoded genes: {err})", UserWarning)
                obs, src_rows, pert, ctx, batch = (v[~as_is] for v in (obs, src_rows, pert,
                                                                       ctx, batch))
                as_is = as_is[~as_is]
        if inplace and not np.array_equal(src_rows, np.arange(adata.n_obs)):
            raise DataError("inplace=True: the prediction does not hold every input cell (the "
                            "control cells could not be copied, see the warning); leave "
                            "inplace out.")

        # the network's inputs: perturbation and batch codes, basal groups
        pcode = np.full(len(pert), -1, dtype=np.int64)  # (copied controls need no codes)
        pcode[~as_is] = encode_perturbations(pert[~as_is], vocab, unknown_perturbation)
        pcode, untrained = self._route_untrained(pcode, "input", vocab, untrained_perturbation)
        bcode = np.zeros(len(pert), dtype=np.int64)
        if self.network_config_.batch_encoder:
            bcode[~as_is] = encode_batches(batch[~as_is], self.vocab_, unknown_batch,
                                           getattr(self, "trained_batches_", None))
        run_rows = np.flatnonzero(~as_is)
        if len(run_rows) == 0:
            raise DataError("the input holds control cells only and predict_controls=False: "
                            "nothing to predict.")
        found = basal_groups(ctx, pert, batch, run_rows, np.flatnonzero(is_ctrl), ctx_all,
                             batch_all, pool_mode, "all_controls" if own_basal else basal_fallback)
        set_len = int(set_len or self.cell_set_len_)
        res = self._run_predict_groups(
            x_in, found, pcode, bcode, src_rows, vocab, as_is, real_counts, own_basal=own_basal,
            set_len=set_len, seed=seed, windows=windows, matmul_precision=matmul_precision,
            sets_per_pass=sets_per_pass)

        # the output AnnData, with the call's record
        obs["statetx_ctrl_barcode"] = np.asarray(adata.obs_names)[res["basal_row"]]
        obs["statetx_set"] = res["set_id"]
        if layout == "arc":
            out = self._arc_layout(adata, src_rows, obs, res, clip, gene_col, inplace)
        else:
            out = self._statetx_layout(adata, src_rows, obs, res, clip, gene_col, keep_input)
        out.uns["statetx"] = self._predict_record(
            out, seed=seed, windows=windows, basal=basal, set_len=set_len,
            predict_controls=predict_controls, unknown_perturbation=unknown_perturbation,
            missing_genes=missing_genes, clip=clip, basal_pool=None if own_basal else pool_mode,
            matmul_precision=matmul_precision, control_pert=cols.control, pert_col=pert_col,
            cell_type_col=ct_col, untrained=untrained)
        if all_perts and layout != "arc":  # a virtual experiment keeps the input's uns (§3.4)
            out.uns = {**copy.deepcopy(dict(adata.uns)), **out.uns}  # (a copy: not shared)
        return None if inplace else out

    def _predict_columns(self, pert_col: str | None, cell_type_col: str | bool | None,
                         cell_type_key: str | bool | None, control_pert: str | None,
                         batch_col: str | None, basal_pool: str | None,
                         gene_name_col: str | bool | None, own_basal: bool
                         ) -> tuple[Any, str | None, str, str | None]:
        """What :meth:`predict` reads from its input, its options over the model's: the
        columns and control label (:func:`statetx.predict.input_columns`), the batch column,
        where basal cells come from (``basal_pool`` checked) and the var column of gene
        names."""
        c = self.columns_
        if own_basal and basal_pool is not None:
            raise ConfigError("basal_pool chooses the controls basal cells are drawn from; "
                              "basal='self' draws none: leave basal_pool out.")
        cols = input_columns(c, pert_col, cell_type_col, cell_type_key, control_pert, basal_pool)
        batch_col = batch_col or c.batch_col
        pool_mode = resolve_pool(cols.basal_pool, "batch" if self._pairing() == "batch"
                                 and not own_basal else "cell_type", batch_col)
        return cols, batch_col, pool_mode, input_gene_col(c, gene_name_col)

    def _predict_rows(self, adata: ad.AnnData, pert: np.ndarray, ctx: np.ndarray,
                      batch: np.ndarray, is_ctrl: np.ndarray, control: str, seed: int,
                      pert_col: str, vocab: Vocab, *, all_perts: bool,
                      n_cells_per_pert: int | Mapping[str, int] | None,
                      perturbations: Sequence[str] | None, min_cells: int | None,
                      max_cells: int | None, own_basal: bool, keep: tuple[str | None, ...]
                      ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows :meth:`predict` outputs: the input's cells, then (``all_perts``) virtual
        cells cloned from its controls, with every group but the control's resized to
        ``min_cells`` / ``max_cells``. Returns their obs, input row, perturbation, context
        and batch."""
        obs = adata.obs.copy()
        src_rows = np.arange(adata.n_obs)
        if all_perts:
            obs, src_rows, pert, ctx, batch = self._virtual_cells(
                adata, pert, ctx, batch, is_ctrl, control, n_cells_per_pert, seed, pert_col,
                vocab.perturbations, perturbations, every_control=own_basal, keep=keep)
        if min_cells is not None or max_cells is not None:
            rows = resize_groups(ctx, pert, control, min_cells, max_cells, seed)
            obs, src_rows, pert, ctx, batch = (obs.iloc[rows], src_rows[rows], pert[rows],
                                               ctx[rows], batch[rows])
            if obs.index.has_duplicates:  # clones: the cell's name with a suffix
                obs.index = ad.utils.make_index_unique(obs.index.astype(str))
        return obs, src_rows, pert, ctx, batch

    def _run_predict_groups(self, x_in: np.ndarray, found: Sequence[Any], pcode: np.ndarray,
                            bcode: np.ndarray, src_rows: np.ndarray, vocab: Vocab,
                            as_is: np.ndarray, real_counts: np.ndarray | None, *,
                            own_basal: bool, set_len: int, seed: int, windows: str,
                            matmul_precision: str, sets_per_pass: int) -> dict:
        """:meth:`predict`'s outputs of every row (:func:`statetx.predict.run_groups`' dict):
        the network over the groups ``found`` (:func:`basal_groups`), each with its rows'
        perturbation and batch codes, starting from drawn controls or (``own_basal``) the
        rows' own input cells; the rows ``as_is`` (copied controls) get their input values
        (and ``real_counts``)."""
        groups = [Group(g.rows, g.pool, int(pcode[g.rows[0]]), bcode[g.rows], group_key(*g.key),
                        src_rows[g.rows] if own_basal else None) for g in found]
        res = run_groups(self.network_, x_in, groups, pert_table(vocab), len(pcode),
                         set_len=set_len, seed=seed, window_mode=windows,
                         device=next(self.network_.parameters()).device,
                         matmul_precision=matmul_precision, sets_per_pass=sets_per_pass)
        res["pred"][as_is] = x_in[src_rows[as_is]]
        res["basal_row"][as_is] = src_rows[as_is]
        if real_counts is not None:
            res["counts"][as_is] = real_counts
        return res

    def _statetx_layout(self, adata: ad.AnnData, src_rows: np.ndarray, obs: pd.DataFrame,
                        res: dict, clip: Any, gene_col: str | None, keep_input: bool
                        ) -> ad.AnnData:
        """:meth:`predict`'s default layout: a new AnnData of the predictions (:meth:`_output`)
        with the input's gene annotations, and (``keep_input``) its obsm and layers."""
        out = self._output(res, obs, clip)
        _carry_var(adata, out, gene_col)
        if keep_input:
            _carry_input(adata, src_rows, out)
        return out

    def _predict_record(self, out: ad.AnnData, *, seed: int, windows: str, basal: str,
                        set_len: int, predict_controls: bool, unknown_perturbation: str,
                        missing_genes: str, clip: Any, basal_pool: str | None,
                        matmul_precision: str, control_pert: str, pert_col: str,
                        cell_type_col: str | None, untrained: list[str]) -> dict:
        """``uns["statetx"]`` of a :meth:`predict` output: the package version, the model's id
        (and file), the call's settings (``basal_pool`` None: not recorded) and what X holds."""
        from statetx import __version__

        net = self.network_config_
        source = getattr(self, "checkpoint_path_", None) or getattr(self, "run_dir_", None)
        return {"version": __version__, "model_id": weights_digest(self.network_),
                "seed": int(seed), "windows": windows, "basal": basal, "set_len": set_len,
                "predict_controls": bool(predict_controls),
                "unknown_perturbation": unknown_perturbation,
                "missing_genes": missing_genes, "clip": str(clip),
                **({} if basal_pool is None else {"basal_pool": basal_pool}),
                "attention": net.attention,
                "rope": "none" if net.rope is None else float(net.rope),
                "matmul_precision": matmul_precision,
                "control_pert": control_pert, "pert_col": pert_col,
                **({"celltype_col": cell_type_col} if cell_type_col in out.obs else {}),
                "scale": self._output_scale, **_untrained_record(untrained),
                **({"model": str(Path(source).absolute())} if source is not None else {})}

    def finetune_on_controls(self, steps: int, split: str = "test", *, lr: float = 1e-5,
                             seed: int | None = None) -> StateTransitionModel:
        """Test-time fine-tuning (reference ``tx predict --test-time-finetune``): ``steps`` Adam
        steps at ``lr`` on sets of the split's control cells only (control → control), one set
        per step, before predicting that split. Changes the network in place and appends the
        call's settings to ``finetuned_`` (kept by :meth:`save` / :meth:`load`); returns ``self``.
        ``seed`` seeds the sets, their control pairing and the training (default: the
        estimator's ``seed``). With a batch encoder, the split's batches without training cells
        start from the trained batches' mean embedding and count as trained afterwards.
        """
        from dataclasses import replace

        self._check_fitted()
        seed = self._seed(seed)
        as_count("steps", steps)
        data = self._split_data("finetune_on_controls")
        if split not in data.splits:
            raise ConfigError(f"finetune_on_controls needs the {split!r} split of the fitted "
                              f"spec, which has {', '.join(map(repr, data.splits))}."
                              f"{did_you_mean(str(split), list(data.splits))}")
        split_data = data.splits[split]
        if not split_data.is_control.any():
            raise DataError(f"the {split!r} split has no control cells to fine-tune on.")
        controls = replace(split_data, is_target=split_data.is_control.copy())
        # (the split's vocabulary: a re-split may have added cell types and batches)
        sampler = CellSetSampler(controls, data.vocab, self.cell_set_len_, 1, seed=seed,
                                 pairing=self._pairing())
        self._tune_batches(np.asarray(data.vocab.batches, dtype=object)[
            np.unique(controls.batch[controls.is_target])])
        device = next(self.network_.parameters()).device
        cfg = TrainConfig(max_steps=int(steps), lr=float(lr), loss=self.loss,
                          **split_loss_kwargs(self.loss_kwargs),
                          gradient_clip_val=self.gradient_clip_val, precision=self.precision,
                          matmul_precision=self.matmul_precision, val_freq=10**9,
                          ckpt_every_n_steps=10**9, seed=int(seed), progress=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            Trainer(self.network_, sampler, None, cfg, device=device).fit()  # own RNG stream
        self.network_.eval()
        record = {"steps": int(steps), "split": split, "lr": float(lr), "seed": int(seed)}
        self.finetuned_ = [*getattr(self, "finetuned_", []), record]
        return self

    def _tune_batches(self, names: np.ndarray) -> None:
        """Batches ``names`` are about to be fine-tuned: those without training cells start
        from the trained batches' mean embedding (not their random start) and count as trained
        from now on (their tuned rows are then read, not the mean)."""
        trained = getattr(self, "trained_batches_", None)
        if self.network_.batch_encoder is None or trained is None:
            return
        known = [n for n in names if n in self.vocab_.batches]
        new = [n for n in known if n not in trained]
        if new:
            table = self.network_.batch_encoder.weight
            with torch.no_grad():
                table[self.vocab_.encode("batch", new)] = table[
                    self.vocab_.encode("batch", trained)].mean(0)
        tuned = set(trained) | set(known)
        self.trained_batches_ = [b for b in self.vocab_.batches if b in tuned]
        persist.mark_trained_batches(self)

    def simulate(self, controls: ad.AnnData,
                 perturbations: Sequence[str] | Mapping[str, int] | None = None,
                 n_cells: int | None = None, *, tsv: str | Path | pd.DataFrame | None = None,
                 seed: int | None = None, **predict_options: Any) -> ad.AnnData:
        """A virtual experiment: every perturbation applied to clones of control cells.

        Parameters
        ----------
        controls
            Control cells (with their cell type, and batch column for batch pairing).
        perturbations
            None = every perturbation the model knows (reference ``--all-perts``), a list of
            names, or a mapping name → cells.
        n_cells
            Clones per perturbation and context (default: the context's number of controls).
        tsv
            A table (tab-separated file or DataFrame) with columns ``perturbation`` and
            ``num_cells`` instead (counts per context; ``tx infer --tsv``, as the reference,
            clones from all controls).
        seed, predict_options
            As in :meth:`predict`; clones are drawn with replacement from the context's control
            cells and predicted as there. With ``basal="self"`` each clone starts from the
            control it copies (without ``n_cells``: every control once per perturbation).

        Returns
        -------
        AnnData
            The input's cells followed by the virtual ones (named
            ``<context>_<perturbation>_<i>``), with the input's ``var`` columns and ``uns``.
            A virtual cell's obs holds its perturbation, cell type and batch; the input's other
            obs columns are left empty for it (a control's values describe a control), and
            ``statetx_ctrl_barcode`` names the control cell it was predicted from.
        """
        if n_cells is not None and (tsv is not None or isinstance(perturbations, Mapping)):
            raise ConfigError("n_cells is given twice: by the cell counts of the "
                              + ("tsv" if tsv is not None else "perturbations mapping")
                              + " and by n_cells=; give one.")
        if tsv is not None:
            if perturbations is not None:
                raise ConfigError("pass perturbations or tsv, not both.")
            where = "tsv table" if isinstance(tsv, pd.DataFrame) else f"tsv {tsv}"
            if not isinstance(tsv, pd.DataFrame) and not Path(tsv).is_file():
                raise DataError(f"{where}: file not found.")
            table = tsv if isinstance(tsv, pd.DataFrame) else pd.read_csv(tsv, sep="\t")
            if not {"perturbation", "num_cells"} <= set(map(str, table.columns)):
                raise DataError(f"{where}: needs columns 'perturbation' and 'num_cells'; found "
                                f"{', '.join(map(str, table.columns))}.")
            n = pd.to_numeric(table["num_cells"], errors="coerce")
            if n.isna().any() or (n < 0).any() or (n % 1 != 0).any():
                raise DataError(f"{where}: num_cells must be whole numbers >= 0.")
            # rows for the same perturbation add up (as tx infer --tsv)
            perturbations = {str(k): int(v) for k, v in
                             n.groupby(table["perturbation"].astype(str), sort=False).sum().items()}
        as_count("n_cells", n_cells, optional=True)
        if isinstance(perturbations, Mapping):
            n_cells, perturbations = dict(perturbations), list(perturbations)
        elif perturbations is not None:
            perturbations = names_list(perturbations)
        out = self.predict(controls, all_perts=True, perturbations=perturbations,
                           n_cells_per_pert=n_cells, seed=seed, **predict_options)
        if out.var_names.isin(controls.var_names).all():  # var kept (spec §3.4), and uns
            out.var = controls.var.loc[out.var_names].copy()
        return out

    def _virtual_cells(self, adata, pert, ctx, batch, is_ctrl, control, n_cells, seed, pert_col,
                       known, chosen=None, every_control=False, keep=()):
        perts = [p for p in known if p != control]
        per_pert = ({str(k): v for k, v in n_cells.items()} if isinstance(n_cells, Mapping)
                    else {})
        if chosen is None and per_pert:
            chosen = list(per_pert)
        if chosen is not None:
            chosen = names_list(chosen)  # (labels are compared as text, as in fit)
            unknown = [p for p in chosen if p not in perts]
            if unknown:
                raise DataError(
                    f"{len(unknown)} perturbation(s) to simulate are not in the model's "
                    f"vocabulary (or are the control): {preview(unknown)}."
                    f"{did_you_mean(str(unknown[0]), perts)}"
                    + (" The model reads perturbation features: give their vectors with "
                       "pert_features={label: vector} to simulate them."
                       if self.vocab_.pert_features is not None else ""))
            perts = list(dict.fromkeys(chosen))
        if not is_ctrl.any():  # (basal='self' needs no controls, but clones are of controls)
            raise DataError(f"virtual cells are clones of the input's control cells "
                            f"(obs['{pert_col}'] == '{control}'), and it has none; include "
                            "them, or relabel the cells to perturb and predict them with "
                            "basal='self' (without all_perts).")
        # a clone takes its context's columns; the control's other annotations (is_control,
        # condition, sample, QC) describe a control cell: left empty, said once
        keep = [col for col in dict.fromkeys(keep) if col is not None and col in adata.obs
                and col != pert_col]
        empty = [col for col in adata.obs.columns if col not in (pert_col, *keep)]
        flags = _control_flags(adata.obs, empty, is_ctrl)  # (e.g. is_control: False for clones)
        empty = [col for col in empty if col not in flags]
        base = _nullable(adata.obs, empty)
        obs_parts, rows, p_parts, c_parts, b_parts = [base], [np.arange(adata.n_obs)], \
            [pert], [ctx], [batch]
        for context in sorted(np.unique(ctx[is_ctrl])):
            pool = np.flatnonzero(is_ctrl & (ctx == context))
            for p in perts:
                n = int(per_pert.get(p, 0) if per_pert else (n_cells or len(pool)))
                if n == 0:
                    continue
                # (a generator per group: other groups do not change its clones)
                rng = group_rng(seed, group_key(context, p, "clone"))
                pick = (pool if every_control and not (per_pert or n_cells) else
                        pool[rng.integers(len(pool), size=n)])
                o = adata.obs.iloc[pick][keep].copy()
                o.index = [f"{context}_{p}_{i}" for i in range(n)]
                for col in empty:  # (missing, in the column's own type)
                    o[col] = pd.Series(None, index=o.index, dtype=base[col].dtype)
                for col, value in flags.items():
                    o[col] = value
                obs_parts.append(o)
                rows.append(pick)
                p_parts.append(np.full(n, p, dtype=object))
                c_parts.append(ctx[pick])
                b_parts.append(batch[pick])
        obs = pd.concat(obs_parts)[adata.obs.columns] if len(obs_parts) > 1 else adata.obs.copy()
        if empty and len(obs_parts) > 1:
            say(f"virtual cells: obs columns {preview(empty)} are left empty (the control cells' "
                "values describe controls); statetx_ctrl_barcode names the control each was "
                "predicted from.")
        if obs.index.has_duplicates:  # a virtual name equal to an input name (or another's)
            obs.index = ad.utils.make_index_unique(obs.index.astype(str))
        # the input's cells keep their own labels (its control label, if it differs)
        own = obs_labels(adata.obs, pert_col, "the input", "pert_col")
        labels = np.concatenate([own, *p_parts[1:]])
        categorical = isinstance(adata.obs[pert_col].dtype, pd.CategoricalDtype)
        obs[pert_col] = pd.Categorical(labels) if categorical else labels  # (as the input's)
        return (obs, np.concatenate(rows), np.concatenate(p_parts), np.concatenate(c_parts),
                np.concatenate(b_parts))

    def _output(self, res: dict, obs: pd.DataFrame, clip) -> ad.AnnData:
        c = self.columns_
        rng = clip_range(clip, self._expression_output, self.is_log1p_)
        if res["counts"] is not None:
            x, names = res["counts"], self.gene_names_
        else:
            x = res["pred"]
            names = self.var_names_ if self._expression_output else [
                f"emb_{i}" for i in range(x.shape[1])]
        if rng is not None:
            x = np.clip(x, *rng)
        out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(names, dtype=str)))
        if res["counts"] is not None:
            out.obsm[f"{c.embed_key}_pred"] = res["pred"]
        return mark_scale(out, self._output_scale)

    def _counts_source(self) -> str | None:
        """Where a gene decoder's genes live in an input AnnData: None = X, else an obsm key."""
        return counts_source(self.columns_.output_space, self.counts_key)

    def _arc_layout(self, adata: ad.AnnData, src_rows: np.ndarray, obs: pd.DataFrame,
                    res: dict, clip, gene_col: str | None, inplace: bool = False) -> ad.AnnData:
        """A copy of the input rows (``inplace``: the input itself) with the predictions placed
        as arc-state's tx infer does."""
        c = self.columns_
        rng = clip_range(clip, self._expression_output, self.is_log1p_)
        if inplace:
            out = adata
        elif adata.isbacked and not adata.is_view:  # only the rows used are read, once each
            uniq, again = np.unique(src_rows, return_inverse=True)
            out = adata[uniq].to_memory()[again].copy()
        elif adata.isbacked:  # (a view of a backed file cannot be subset again: read it)
            out = adata.to_memory()[src_rows].copy()
        else:
            out = adata[src_rows].copy()
        out.obs = obs
        def place(x: np.ndarray, names: list[str] | None, key: str | None,
                  fallback: str) -> str:
            """Into X (key None) or obsm[key] when it has x's width, columns matched by gene
            name where both sides have names (else by position); otherwise obsm[fallback].
            Returns where it was written: ``"X"`` or the obsm key."""
            if key is None:
                width, dest = out.n_vars, list(map(str, gene_names(out, gene_col)))
            elif key in out.obsm:
                width = np.shape(out.obsm[key])[1]
                dest = hvg_names(out, gene_col) if key == "X_hvg" else None
            else:  # a new obsm entry
                width, dest = x.shape[1], None
            if width == x.shape[1] and names is not None and dest is not None:
                pos = pd.Index(dest).get_indexer(names)
                if (pos >= 0).all() and len(set(pos)) == len(pos):
                    x = x[:, np.argsort(pos)]  # the destination's column order
                else:
                    width = -1  # other genes: never write them under the wrong names
            if width != x.shape[1]:
                out.obsm[fallback] = x
                return fallback
            if key is None:
                out.X = x
                return "X"
            out.obsm[key] = x
            return key

        pred = res["pred"]
        if res["counts"] is None and rng is not None:
            pred = np.clip(pred, *rng)
        written = {place(pred, list(self.var_names_) if self._expression_output else None,
                         c.embed_key, f"{c.embed_key}_pred" if c.embed_key else "X_state_pred")}
        if res["counts"] is not None:
            counts = res["counts"] if rng is None else np.clip(res["counts"], *rng)
            key = self._counts_source()
            written.add(place(counts, self.gene_names_, key,
                              "X_pred" if key is None else f"{key}_pred"))
        if "X" in written and inplace:
            _set_aside_input(out, written)
        elif "X" in written and out.raw is not None:  # scanpy's tools read .raw first
            out.raw = None
            say("predict(layout='arc'): the output's X holds predictions; the input's .raw "
                "(measured values, which scanpy's tools would read instead) is left out.")
        return out

    def predict_split(self, split: str = "test", *, seed: int | None = None, clip: Any = "auto",
                      windows: str = "balanced", controls: str = "predicted",
                      matmul_precision: str = "highest", pseudobulk: bool = False,
                      pert_features: str | Path | Mapping[str, Any] | None = None,
                      untrained_perturbation: str = "control",
                      additional_obs: Sequence[str] | None = None,
                      ) -> tuple[ad.AnnData, ad.AnnData]:
        """Predict the held-out cells of a split of the fitted spec: ``(adata_pred, adata_real)``.

        With a batch encoder, the cells of batches without training cells (a held-out batch or
        donor), whose embedding rows never trained, get the mean embedding of the trained
        batches (warned, naming them), as ``predict(unknown_batch="mean")`` does.

        Parameters
        ----------
        split
            ``"test"`` (default), ``"val"`` or ``"train"``.
        controls
            ``"predicted"`` (reference ``tx predict``) runs the control cells as control sets
            too; ``"real"`` copies the real control cells into the prediction (the VCC
            convention, and what the baselines do), so that every model's deltas are measured
            from the same real controls.
        pseudobulk
            ``True`` (``tx predict --pseudobulk``): one row per (cell type, perturbation)
            instead (per dataset too, ``obs["dataset"]``, when the spec has several), the mean
            of the same cells' (clipped) predictions and real values, accumulated while
            predicting: no per-cell matrix is built; obs has the perturbation and cell type
            columns and ``n_cells``. Metrics computed from pseudobulks (``pearson_delta``,
            ``mse``, ``mae``, the discrimination scores, …) are the same on these rows as on the
            cells of a log1p model; DE needs the cells.
        pert_features
            Vectors for the split's perturbations without training cells (e.g. held out with
            no row in the training feature table).
        additional_obs
            More obs columns of the data to copy into both (beside the fitted model's
            ``additional_obs``), e.g. ``["donor", "n_counts"]``.
        seed, clip, windows, matmul_precision, untrained_perturbation
            As in :meth:`predict`.

        Returns
        -------
        adata_pred, adata_real
            The same cells in the same order in both, named by their own barcodes (made unique
            across files); obs has the perturbation, cell type and (with ``batch_col``) batch
            columns plus ``pert_cell_barcode`` / ``ctrl_cell_barcode`` (and the
            ``additional_obs`` columns of the fitted model, and ``dataset`` when the spec has
            several); var holds the training data's gene annotations (of its first file);
            both are clipped to [0, 14] for log1p expression outputs (at 0 for
            count-scale ones). A model that decodes genes (an embedding input, gene outputs) has
            the decoded genes in X and the latent predictions and the real latents in
            ``obsm[embed_key]`` of both, as the reference writes them.
        """
        check_matmul_precision(matmul_precision)
        seed = self._seed(seed)
        if controls not in ("predicted", "real"):
            raise ConfigError(f"controls={controls!r} is invalid; expected 'predicted' or 'real'.")
        self._check_fitted()
        prepared = self._split_data("predict_split")
        if split not in prepared.splits:
            raise DataError(f"the fitted split spec has no '{split}' split (available: "
                            f"{', '.join(prepared.splits)}).")
        d = prepared.splits[split]
        cells, order = split_groups(prepared, d,
                                    "batch" if self._pairing() == "batch" else "cell_type")
        vocab = self._vocab_with(pert_features)  # (new names are appended: codes unchanged)
        codes, untrained = self._route_untrained(
            np.array([g.key[1] for _, g, _ in cells], dtype=np.int64), f"{split} split", vocab,
            untrained_perturbation)
        self._warn_held_out_batches(d.batch, f"{split} split")  # (the network reads them)
        groups = [Group(rows, g.pool, int(code), d.batch[g.rows], key)
                  for (rows, g, key), code in zip(cells, codes)]
        v, c = prepared.vocab, self.columns_  # (cell types and batches may be new to the model)
        datasets = split_datasets(prepared, d, order,
                                  np.asarray(v.cell_types, dtype=object)[d.cell_type[order]])
        run = partial(run_groups, self.network_, d.X, groups, pert_table(vocab),
                      len(order), set_len=self.cell_set_len_, seed=seed, window_mode=windows,
                      device=next(self.network_.parameters()).device,
                      matmul_precision=matmul_precision)
        info = {"split": split, "seed": int(seed), "pert_col": self.columns_.pert_col,
                "control_pert": self.vocab_.control_pert,
                "celltype_col": self.columns_.cell_type_key, "scale": self._output_scale,
                **_untrained_record(untrained)}
        if pseudobulk:
            if additional_obs:
                raise ConfigError("additional_obs= copies per-cell obs columns; pseudobulk rows "
                                  "are groups of cells: leave one of them out.")
            pair = self._split_pseudobulks(d, order, run, clip, controls, datasets)
            for a in pair:
                a.uns["statetx"] = dict(info)
            pair[0].uns["statetx"]["model_id"] = weights_digest(self.network_)
            return pair
        res = run()
        obs = split_cell_obs(prepared, d, order, res["basal_row"], datasets)
        extra = self._additional_obs(additional_obs)
        if extra and d.file_row is not None:
            for col, values in split_obs(prepared, d, order, extra).items():
                obs[col] = values.array  # (its dtype kept: categorical, nullable, ...)
        pred = with_training_var(self._output(res, obs.copy(), clip), prepared)
        # the real cells in the prediction's space: decoded genes only when the model decodes
        real_src = d.counts if d.counts is not None and res["counts"] is not None else d.X
        real_x = real_src[torch.from_numpy(order)].float()
        real_x = real_x.numpy()
        rng = clip_range(clip, self._expression_output, self.is_log1p_)
        if rng is not None:
            real_x = np.clip(real_x, *rng)
        real = mark_scale(ad.AnnData(X=real_x, obs=obs.copy(), var=pred.var.copy()),
                          self._output_scale)
        if res["counts"] is not None:  # the latents next to the decoded genes, as the reference
            _split_latents(pred, real, c.embed_key, d.X[torch.from_numpy(order)].float().numpy())
        if controls == "real":
            is_ctrl = d.is_control[order]
            pred.X[is_ctrl] = real_x[is_ctrl]
            if res["counts"] is not None:  # the latent output: the control cells' own
                pred.obsm[c.embed_key][is_ctrl] = real.obsm[c.embed_key][is_ctrl]
            pred.obs.loc[is_ctrl, "ctrl_cell_barcode"] = pred.obs.loc[is_ctrl, "pert_cell_barcode"]
        for a in (pred, real):
            a.uns["statetx"] = dict(info)
        pred.uns["statetx"]["model_id"] = weights_digest(self.network_)  # (what made pred)
        return pred, real

    def _split_data(self, what: str) -> PreparedData:
        """The fitted spec's split data; for a model loaded from a run folder whose split.toml
        names files that are there, read again from them (said)."""
        prepared = getattr(self, "_prepared", None)
        if prepared is not None:
            return prepared
        run = getattr(self, "run_dir_", None)
        why = ""
        if run is not None and (Path(run) / "split.toml").is_file():
            say(f"{what}: reading the split data from {run}/split.toml's files")
            try:
                return attach_data(self)
            except (DataError, ConfigError, OSError) as err:
                why = f" (reading the run's split.toml files failed: {err})"
        raise DataError(f"{what} needs the training data, which is not kept when a model "
                        "is pickled or saved: attach it with statetx.run.attach_data(model, "
                        "adata=...) (a run folder's own files are found from its "
                        f"split.toml: attach_data(model)), or use predict(adata).{why}")

    def _split_pseudobulks(self, d: Any, order: np.ndarray, run: Callable, clip: Any,
                           controls: str, datasets: np.ndarray | None = None
                           ) -> tuple[ad.AnnData, ad.AnnData]:
        """``predict_split(pseudobulk=True)``: per (cell type, perturbation) means — per
        dataset too when ``datasets`` names each row's — of the predictions (accumulated by
        ``run``) and of the real cells (read a block at a time)."""
        v, c = self._prepared.vocab, self.columns_
        n_p, n_ct = len(v.perturbations), len(v.cell_types)
        ds_code, ds_names = (np.zeros(len(order), dtype=np.int64), None) if datasets is None \
            else pd.factorize(datasets, sort=True)
        key = (ds_code * n_ct + d.cell_type[order]) * n_p + d.pert[order]
        uniq, row_group = np.unique(key, return_inverse=True)
        row_group = row_group.reshape(-1)
        rng = clip_range(clip, self._expression_output, self.is_log1p_)
        means = GroupMeans(row_group, len(uniq), rng)
        run(means=means)
        decodes = "counts" in means.sums
        real_src = d.counts if d.counts is not None and decodes else d.X
        real = _group_means(real_src, order, row_group, means.n_cells, rng)
        ds_ct, perts = np.divmod(uniq, n_p)
        ds, cts = np.divmod(ds_ct, n_ct)
        names = np.asarray(v.perturbations, dtype=object)[perts]
        obs = pd.DataFrame({
            c.pert_col: pd.Categorical(names),
            c.cell_type_key: pd.Categorical(np.asarray(v.cell_types, dtype=object)[cts]),
            "n_cells": means.n_cells,
        }, index=pd.Index([f"pseudobulk{i}" for i in range(len(uniq))]))
        if ds_names is not None:
            obs["dataset"] = pd.Categorical(np.asarray(ds_names, dtype=object)[ds])
        pred = with_training_var(self._output({"pred": means.means("pred"),
                                       "counts": means.means("counts")}, obs.copy(), None),
                         self._prepared)
        real = ad.AnnData(X=real, obs=obs, var=pred.var.copy())
        if decodes:
            _split_latents(pred, real, c.embed_key,
                           _group_means(d.X, order, row_group, means.n_cells, None))
        if controls == "real":
            is_ctrl = names == v.control_pert
            pred.X[is_ctrl] = real.X[is_ctrl]
            if decodes:  # the latent output: the control cells' own, averaged
                pred.obsm[c.embed_key][is_ctrl] = real.obsm[c.embed_key][is_ctrl]
        for a in (pred, real):  # statetx.evaluate then skips the metrics that need cells
            a.uns["statetx_pseudobulk"] = True
        return pred, real

    def score(self, adata: ad.AnnData, **predict_options: Any) -> float:
        """Mean Pearson correlation of predicted vs real mean shift (perturbed − control).

        For each (cell type, perturbation) of ``adata``, the shift is the mean over its cells
        minus the mean of that cell type's real controls, computed on the predicted and on the
        real cells; higher is better (1 = perfect direction of every shift).
        ``predict_options`` go to :meth:`predict` (the real controls are the reference, so
        ``predict_controls`` is not one of them).
        """
        if "predict_controls" in predict_options:
            raise ConfigError("score() compares the predicted perturbed cells with the real "
                              "controls, so predict_controls cannot be set; leave it out.")
        if predict_options.get("basal") == "self":
            raise ConfigError("score() predicts the perturbed cells from control cells; "
                              "basal='self' would start them from their own, already perturbed "
                              "state. Leave basal out.")
        pred = self.predict(adata, predict_controls=False, **predict_options)
        x_real = align_genes(adata, self.var_names_, self.columns_.embed_key,
                             predict_options.get("missing_genes", "error"),
                             input_gene_col(self.columns_, predict_options.get("gene_name_col")))
        c = self.columns_
        if pred.n_vars != x_real.shape[1]:
            raise DataError("score() needs the prediction and the input in the same space.")
        cols = input_columns(c, *(predict_options.get(k) for k in (
            "pert_col", "cell_type_col", "cell_type_key", "control_pert", "basal_pool")))
        control = cols.control
        pert, ctx, _ = input_labels(adata, cols.pert_col, cols.cell_type_col, control,
                                    self.vocab_.cell_types, cols.cell_type_given,
                                    cols.basal_pool == "all")
        rows = pd.Index(adata.obs_names).get_indexer(pred.obs_names)  # (cell names are unique)
        if (rows < 0).any():
            raise ConfigError("score() compares the predictions of the input's own cells; leave "
                              "out the options that add cells (all_perts, min_cells).")
        pred_pert, pred_ctx = pert[rows], ctx[rows]
        scores = []
        for cx in np.unique(ctx):
            ctrl_mean = x_real[(ctx == cx) & (pert == control)].mean(0)
            for p in np.unique(pert[(ctx == cx) & (pert != control)]):
                real = x_real[(ctx == cx) & (pert == p)].mean(0) - ctrl_mean
                pr = np.asarray(pred.X[(pred_ctx == cx) & (pred_pert == p)]).mean(0) - ctrl_mean
                scores.append(float(np.corrcoef(real, pr)[0, 1]))
        if not scores:
            raise DataError("score() found no perturbed cells with controls in the same cell type.")
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ persistence
    # (the logic is in statetx.persist; these keep the estimator's API)
    def to_arc_state(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model as an arc-state 0.11.1 run directory that ``state tx infer
        --model-dir PATH`` (and :meth:`from_arc_state`) reads; see
        :func:`statetx.arc_export.export_arc` for which networks can be written (the reference
        presets can; ``small``'s per-perturbation skip cannot). An existing non-empty ``path``
        is refused unless ``overwrite`` (and it is an arc-state run, then replaced whole).
        Returns ``path``."""
        from statetx.arc_export import export_arc

        return export_arc(self, path, overwrite=overwrite)

    def save(self, path: str | Path) -> Path:
        """Write ``model.json`` and ``model.safetensors`` into the directory ``path`` (and, for a
        model trained with perturbation features, ``pert_features.safetensors``, which
        ``model.json`` names by shape and digest). ``model.json`` records the weights' SHA-256
        too: :meth:`load` refuses a folder whose files come from different saves (a save over
        an earlier model interrupted between its renames)."""
        return persist.save(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> StateTransitionModel:
        """Load a model written by :meth:`save` from the folder ``path`` onto ``device``
        (default ``"cpu"``; ``"auto"``, ``"cuda"``, ...). No pickled code is executed."""
        return persist.load(cls, path, device)

    @classmethod
    def from_arc_state(cls, run_dir: str | Path, checkpoint: str | Path = "final.ckpt", *,
                       attention: str | None = None, rope: Any = ...,
                       verbose: bool = True, **options: Any) -> StateTransitionModel:
        """A fitted model from an arc-state (0.9.x / 0.11.x) run directory and checkpoint.

        The checkpoint is read without executing pickled code. ``attention`` / ``rope`` override
        what the checkpoint records (required for 0.9.x Llama checkpoints, which do not record
        whether they ran bidirectional or causal). Other ``options`` go to
        :func:`statetx.arc.load_arc_run`. The resolution notes (attention mode, positions, output
        activation, dropped modules, licence) are printed (unless ``verbose=False``) and kept in
        ``arc_import_``. ``run_dir`` is the arc-state run directory (or a checkpoint file in
        one); ``checkpoint`` a file name in its ``checkpoints/`` or a path (default
        ``final.ckpt``, else ``last.ckpt``).
        """
        return persist.from_arc_state(cls, run_dir, checkpoint, attention=attention, rope=rope,
                                      verbose=verbose, **options)

    from_arc_run = from_arc_state  # the name in the spec (arc-checkpoints.md)

    @classmethod
    def load_run(cls, run_dir: str | Path, checkpoint: str | Path | None = None, *,
                 device: str = "cpu", verbose: bool = True) -> StateTransitionModel:
        """Load a fitted model from a training run directory (``output_dir/name``).

        ``checkpoint``: a file name in ``checkpoints/`` or a path; default ``final.ckpt``, else
        ``last.ckpt`` (printed unless ``verbose=False``); ``device``: where the model is moved
        (default ``"cpu"``). Weights-only loading. See :func:`statetx.run.load_run`.
        """
        return load_model(cls, run_dir, checkpoint, device=device, verbose=verbose)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        return persist.pickled_state(super().__getstate__())

    def __deepcopy__(self, memo: dict) -> StateTransitionModel:
        return deepcopy_sharing(self, memo)  # (the copy can predict_split: same data)

    def __setstate__(self, state: dict) -> None:
        persist.restore_pickled(self, state, super().__setstate__)

    @property
    def feature_names_in_(self) -> np.ndarray:
        """The input feature names (scikit-learn's name for ``var_names_``)."""
        return np.asarray(self.var_names_, dtype=object)

    @property
    def device_(self) -> torch.device:
        """The device the fitted network is on: where fit trained it, or where :meth:`to`,
        :meth:`load` (``device=``) or unpickling (the CPU) put it."""
        self._check_fitted()
        weight = next(self.network_.parameters(), None)
        return torch.device("cpu") if weight is None else weight.device

    @property
    def pert_feature_table_(self) -> dict[str, np.ndarray] | None:
        """The perturbation feature vectors the model knows, name → vector (a copy); None for
        one-hot perturbations. With :func:`statetx.tl.combination_features` it gives new
        combined labels their vectors."""
        self._check_fitted()
        if self.vocab_.pert_features is None:
            return None
        return {n: row.copy() for n, row in self.vocab_.vectors().items()}

    def to(self, device: str | torch.device) -> StateTransitionModel:
        """Move the fitted network to ``device`` (for prediction)."""
        self._check_fitted()
        self.network_.to(resolve_device(device))
        return self


def _warn_idle_options(cfg: TrainConfig, validates: bool, blind: bool = False) -> None:
    """Training options that this run's other settings keep from acting are said, not ignored
    (``blind``: the validation split is skipped, its perturbations being untrained)."""
    idle = []
    if cfg.early_stopping_patience is not None and blind:
        idle.append(f"early_stopping_patience={cfg.early_stopping_patience}: validation is "
                    "skipped (its perturbations have no training cells, see the warning above)")
    elif cfg.early_stopping_patience is not None and not validates:
        idle.append(f"early_stopping_patience={cfg.early_stopping_patience}: the split spec has "
                    "no validation part (add one, e.g. a zero-shot '= \"val\"' cell type)")
    elif cfg.early_stopping_patience is not None:
        runs = max(cfg.max_steps // cfg.val_freq, 1)  # (the last step's counts only without
        # a validation on the schedule)
        if runs <= cfg.early_stopping_patience:
            idle.append(f"early_stopping_patience={cfg.early_stopping_patience}: with val_freq="
                        f"{cfg.val_freq} and max_steps={cfg.max_steps} validation runs {runs} "
                        f"time(s), and stopping needs {cfg.early_stopping_patience + 1} (lower "
                        "val_freq)")
    if cfg.warmup_steps > cfg.max_steps:
        idle.append(f"warmup_steps={cfg.warmup_steps} > max_steps={cfg.max_steps}: the learning "
                    f"rate never reaches lr={cfg.lr:g}")
    if cfg.averaging_start > 0 and cfg.weight_averaging == "none":
        idle.append(f"averaging_start={cfg.averaging_start}: weight averaging is off "
                    "(weight_averaging='uniform' turns it on)")
    if idle:
        warn("training options without effect in this run: " + "; ".join(idle) + ".", UserWarning)


def _warn_padding(sampler: Any, pairing: str, strategy: str) -> None:
    """Most set positions padding: the groups are small for the set length (a large preset on
    small data, or batch pairing splitting the groups by batch, e.g. gem groups)."""
    pad = sampler.padding_fraction()
    if pad <= 0.5:
        return
    sizes = np.array([len(g) for g in sampler.groups])
    what = ("(cell type, batch, perturbation)" if pairing == "batch"
            else "(cell type, perturbation)")
    advice = ("a smaller cell_set_len (model.kwargs.cell_set_len), or a preset made for data "
              "this size (preset='small' / model=small)")
    if pairing == "batch":
        advice = (f"basal_mapping_strategy='random' (batch pairing is "
                  f"{'the default with a batch_col' if strategy == 'auto' else 'chosen'}; "
                  "random builds sets per (cell type, perturbation), with controls from the "
                  "whole cell type), or " + advice)
    warn(
        f"{100 * pad:.0f}% of the training set positions are padding (cells drawn again): "
        f"sets are built per {what} group, and the {len(sizes):,} groups hold a median of "
        f"{np.median(sizes):g} cells for sets of {sampler.S}. Consider {advice}.", UserWarning)


def _warn_unpaired_batches(prepared: PreparedData, strategy: str) -> None:
    """Batch pairing: perturbed training cells of a (cell type, batch) without controls draw
    their basal cells from the cell type's controls of every batch (as predict says). When no
    perturbed cell has controls in its batch, the batch column follows the perturbation (a
    sample column, one sample per condition) and batch pairing pairs nothing."""
    split = prepared.splits["train"]
    perturbed = np.flatnonzero(split.is_target & ~split.is_control)
    ctrl = np.flatnonzero(split.is_control)
    elsewhere = batches_without_controls(split.context, split.batch, perturbed, ctrl,
                                         split.context, split.batch)
    more = ""
    paired = np.isin(split.context[perturbed], split.context[ctrl]).sum()  # (context has any)
    if elsewhere and sum(elsewhere.values()) == paired:
        more = (f" No perturbed training cell has controls in its batch: obs['"
                f"{prepared.columns.batch_col}'] looks confounded with the perturbation (e.g. "
                "a sample column with one sample per condition), so batch pairing pairs "
                "nothing. Pass basal_mapping_strategy='random' (batch pairing is "
                f"{'the default with a batch_col' if strategy == 'auto' else 'chosen'}), or a "
                "batch_col whose batches hold both control and perturbed cells (e.g. a donor, "
                "plate or gem group).")
    warn_batch_fallback(elsewhere, batch_in_context(prepared, split),
                        "perturbed training cells", more)


def _nullable(obs: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``obs`` with its integer and boolean ``columns`` in pandas' nullable types (Int64,
    UInt8, boolean, ...: exact values, and room for missing ones)."""
    obs = obs.copy()
    for col in columns:
        dtype = obs[col].dtype
        if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
            obs[col] = obs[col].convert_dtypes(infer_objects=False, convert_string=False,
                                               convert_floating=False)
    return obs


def _control_flags(obs: pd.DataFrame, columns: Sequence[str],
                   is_ctrl: np.ndarray) -> dict[str, bool]:
    """Boolean ``columns`` that mark exactly the control cells (or exactly the others), with
    their value for a perturbed cell. With controls only (a constant column says nothing), only
    columns named for controls (``is_control``, ``ctrl``, ...) count."""
    mixed = bool(is_ctrl.any() and not is_ctrl.all())
    out = {}
    for col in columns:
        values = obs[col]
        named = any(word in str(col).lower() for word in ("control", "ctrl"))
        if ((mixed or named) and pd.api.types.is_bool_dtype(values.dtype)
                and not values.isna().any()):
            flags = values.to_numpy(dtype=bool)
            if np.array_equal(flags, is_ctrl) or np.array_equal(flags, ~is_ctrl):
                out[col] = not bool(np.array_equal(flags, is_ctrl))
    return out


def _say_new_contexts(ctx: np.ndarray, trained: Sequence[str]) -> None:
    """Cell types that were not in the model's data are predicted zero-shot (said); one that
    differs from a known one only in case is likely a typo (a warning). Nothing is said when
    the model knows no cell types (the import notes say why)."""
    new = sorted(set(map(str, np.unique(ctx))) - set(trained) - {"all"})
    if not new or not trained:  # (an imported run without its cell-type map knows none)
        return
    folded = {t.casefold(): t for t in trained}
    typos = {n: folded[n.casefold()] for n in new if n.casefold() in folded}
    if typos:
        warn("cell type(s) " + ", ".join(f"'{n}' (trained: '{t}')" for n, t in
                                         typos.items())
             + " differ from the model's only in case: they are predicted as new cell "
             "types. Fix the labels if they are the same.", UserWarning)
    if set(new) - set(typos):
        say(f"cell type(s) not in the model's data: "
            f"{preview(sorted(set(new) - set(typos)))} (predicted zero-shot).")


def _perturbed_codes(split: Any) -> np.ndarray:
    """Vocabulary codes of the perturbations with perturbed cells in a split's cell sets."""
    return np.unique(split.pert[split.is_target & ~split.is_control])


def _untrained_record(names: list[str]) -> dict:
    """``uns["statetx"]`` entry naming the perturbations predicted without training cells
    (evaluate warns that their metrics measure no learned effect); none: no entry."""
    return {"untrained_perturbations": list(names)} if names else {}


def _untrained_only(prepared: PreparedData, split: str) -> bool:
    """Whether every perturbation of ``split``'s perturbed cells lacks training cells, with
    one-hot perturbations (nothing about them is learned: a validation on them measures
    nothing)."""
    if prepared.vocab.pert_features is not None:
        return False
    perts = _perturbed_codes(prepared.splits[split])
    return len(perts) > 0 and not np.isin(perts, _perturbed_codes(prepared.splits["train"])).any()


def _warn_held_out_perturbations(prepared: PreparedData, skipped: str | None = None) -> None:
    """Said when fitting, not first when predicting: held-out perturbations of a one-hot model
    are unseen, so nothing can be learned about them (nor validated on them). ``skipped``:
    the validation split, of such perturbations only, that fit does not validate on."""
    if prepared.vocab.pert_features is not None:
        return
    trained = set(_perturbed_codes(prepared.splits["train"]).tolist())
    held = {name: sorted(set(_perturbed_codes(d).tolist()) - trained)
            for name, d in prepared.splits.items() if name != "train"}
    held = {name: codes for name, codes in held.items() if codes}
    if held:
        names = prepared.vocab.perturbations
        listing = "; ".join(f"{name}: {len(c)} ({preview([repr(names[i]) for i in c])})"
                            for name, c in held.items())
        warn(
            f"perturbations without training cells in the held-out splits ({listing}): with "
            "one-hot perturbations the model learns nothing about them, so predict gives them "
            "the control's (no effect) and validating on them measures nothing"
            + ("" if skipped is None else
               f": the {skipped} split holds only such perturbations, so fit does not validate "
               "(no best.ckpt, no early stopping: the fitted model is the run's final one)")
            + ". To predict "
            "unseen perturbations give pert_features=... (e.g. gene embeddings; "
            "data.kwargs.perturbation_features_file on the command line); to test new "
            "cell types, hold out whole cell types ([zeroshot]) instead.", UserWarning)


def _warn_unused_loss_options(loss: str, options: Mapping | None, decoder: bool) -> None:
    """Loss options that cannot act for this loss or network are said, not silently ignored."""
    acts = {"blur": loss in ("sinkhorn", "se"), "sinkhorn_weight": loss == "se",
            "energy_weight": loss == "se", "decoder_weight": decoder,
            "decoder_loss_weight": decoder, "detach_decoder": decoder}
    idle = [k for k in (options or {}) if not acts.get(k, True)]
    if idle:
        warn(f"loss option(s) {', '.join(idle)} have no effect here (loss {loss!r}, "
             f"{'a' if decoder else 'no'} gene decoder): blur acts with the sinkhorn "
             "and se losses, the weights with se, the decoder options with a gene "
             "decoder.", UserWarning)


def _split_latents(pred: ad.AnnData, real: ad.AnnData, key: str, real_latent: np.ndarray) -> None:
    """predict_split of a model that decodes genes: the latent predictions and the real latents
    in ``obsm[embed_key]`` of ``adata_pred`` / ``adata_real``, where the reference writes them
    (``predict`` keeps the input's key and writes ``<embed_key>_pred``)."""
    pred.obsm[key] = pred.obsm.pop(f"{key}_pred")
    real.obsm[key] = np.asarray(real_latent, dtype=np.float32)


def _carry_var(adata: ad.AnnData, out: ad.AnnData, gene_name_col: str | None) -> None:
    """The input's gene annotations (var columns: IDs, symbols, ...) on the output genes
    (matched by name; missing for output genes the input lacks)."""
    if adata.var.shape[1] == 0:
        return
    names = pd.Index(list(map(str, gene_names(adata, gene_name_col, unique=False))))
    pos = first_positions(names, out.var_names.astype(str))  # (output genes: unique in input)
    if (pos < 0).all():
        return
    var = adata.var.reset_index(drop=True)
    if (pos < 0).any():  # (genes the input lacks, missing_genes="zero": missing values. Only
        # integer and boolean columns change type, to Int64 / boolean; float columns keep
        # float64 with NaN, text stays object with NaN: all types anndata writes, unlike the
        # Float64 / string that DataFrame.convert_dtypes makes)
        var = _nullable(var, list(var.columns))
    var = var.reindex(pos)
    var.index = out.var_names
    out.var = var


def _carry_input(adata: ad.AnnData, src_rows: np.ndarray, out: ad.AnnData) -> None:
    """``keep_input``: the input rows' obsm and (same genes only) layers, next to the output."""
    for key, value in adata.obsm.items():
        if key not in out.obsm:
            out.obsm[key] = value[src_rows]
    if list(map(str, adata.var_names)) == list(map(str, out.var_names)):
        for key, value in adata.layers.items():
            out.layers[key] = value[src_rows]


def _set_aside_input(adata: ad.AnnData, written: set[str]) -> None:
    """``predict(inplace=True)`` wrote X: the input's own expression kept under the names that
    scanpy and statetx read by default — every layer (e.g. ``counts``) and ``obsm['X_hvg']``
    (unless predicted into) — is renamed ``<name>_input`` (names already ending so stay), so
    that nothing takes it for the prediction. One warning names them, and what still holds
    measured values (``.raw``, ``obsm['X_pca']``)."""
    moved = []
    for where, entries in (("layers", adata.layers), ("obsm", adata.obsm)):
        stale = list(entries) if where == "layers" else [
            k for k in ("X_hvg",) if k in entries and k not in written]
        for key in [k for k in stale if not str(k).endswith("_input")]:
            new = f"{key}_input"
            while new in entries:
                new += "_input"
            entries[new] = entries.pop(key)
            moved.append(f"{where}['{key}'] -> {where}['{new}']")
    kept = [what for what, held in (
        (".raw still holds the measured values, which scanpy's tools (e.g. "
         "sc.tl.rank_genes_groups) use by default: pass use_raw=False, or set adata.raw = None",
         adata.raw is not None),
        ("obsm['X_pca'] still holds the input's principal components, which sc.pp.neighbors "
         "uses by default: run sc.pp.pca again", "X_pca" in adata.obsm
         and "X_pca" not in written)) if held]
    if moved or kept:
        warn("predict(inplace=True): X holds the predictions now"
             + (f"; the input's own expression beside it is renamed, so that nothing "
                f"reads it as the prediction (e.g. sc.pp.normalize_total(layer="
                f"'counts'), a model trained on X_hvg): {', '.join(moved)}"
                if moved else "")
             + "".join(f"; {k}" for k in kept) + ".", UserWarning)


def _group_means(src: torch.Tensor, rows: np.ndarray, group: np.ndarray, n_cells: np.ndarray,
                 clip: tuple[float, float] | None) -> np.ndarray:
    """[n_groups, D] float32 means of ``src[rows]`` (clipped) per ``group`` of each row, read
    4,096 rows at a time; ``n_cells`` divides (groups without rows here stay 0)."""
    sums = np.zeros((len(n_cells), src.shape[1]), dtype=np.float64)
    index = torch.from_numpy(rows)
    for lo in range(0, len(rows), 4096):
        x = src[index[lo:lo + 4096]].float().numpy()
        x = np.clip(x, *clip) if clip is not None else x
        g = group[lo:lo + 4096]
        runs = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # a group's rows come in runs
        np.add.at(sums, g[runs], np.add.reduceat(x, runs, axis=0, dtype=np.float64))
    return (sums / np.maximum(n_cells, 1)[:, None]).astype(np.float32)
