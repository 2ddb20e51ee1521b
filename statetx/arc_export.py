"""Export a fitted model as an arc-state 0.11.1 run directory (the inverse of :mod:`statetx.arc`).

``export_arc(model, out)`` writes what arc-state's ``state tx infer --model-dir`` reads
(spec arc-checkpoints.md §1, §3–§5): ``checkpoints/final.ckpt`` (a Lightning-style dict with
``state_dict`` under arc-state's key names and ``hyper_parameters``), ``config.yaml``,
``var_dims.pkl``, ``pert_onehot_map.pt`` and the cell-type and batch maps. Only networks that
arc-state can rebuild are exported: the reference presets' layout (Llama with bidirectional
attention and no positions, or causal with rotary positions θ = 10000; GPT-2 causal without
positions), no statetx-only parts (the ``small`` preset's per-perturbation skip, the input-space
residual), and the reference's output-activation rule.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from statetx._utils import atomic_folder, check_folder
from statetx.arc import STATETX_ORIGIN_KEY, conv1d_layout
from statetx.errors import ConfigError
from statetx.runconfig import config_of_model, dump_config, read_config

if TYPE_CHECKING:  # pragma: no cover
    from statetx.model import StateTransitionModel

ROPE_THETA = 10000.0  # the rotary base of arc-state's causal Llama backbone
TOKEN_ROWS = 8  # the (zero, frozen) token table arc-state's backbones carry: its row count


def export_arc(model: StateTransitionModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as an arc-state run directory ``out`` and return its path.

    Parameters
    ----------
    model
        A fitted :class:`~statetx.StateTransitionModel` whose network arc-state can rebuild
        (see the module docstring); others are refused with the reason.
    out
        The run directory to create; an existing non-empty one is refused unless ``overwrite``
        and it is an arc-state run, which is then replaced whole. The files are written to a
        temporary folder next to ``out`` and put in place when complete: a failure leaves
        ``out`` as it was.

    Returns
    -------
    Path
        ``out``: ``state tx infer --model-dir OUT`` (arc-state 0.11.1) and
        :meth:`StateTransitionModel.from_arc_state` read it.
    """
    model._check_fitted()
    c = model.network_config_
    problems = unexportable(model)
    if problems:
        raise ConfigError("this model cannot be written as an arc-state run: "
                          + "; ".join(problems) + ".")
    out = Path(out)
    check_folder(out, "the export folder")
    if out.exists():
        real = out.resolve()
        if real in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise ConfigError(f"{out} is (or contains) the current folder, which the export "
                              "replaces: export to another folder.")
        sources = [getattr(model, "run_dir_", None),  # (its training run, or the arc-state run
                   (getattr(model, "arc_import_", None) or {}).get("provenance", {}).get(
                       "run_dir")]  # it was imported from)
        if any(s is not None and Path(s).exists() and Path(s).resolve() == real
               for s in sources):
            raise ConfigError(f"{out} is the model's own run folder; export to another folder.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass "
                              "overwrite=True (--overwrite).")
        statetx_files = [n for n in ("statetx_run.json", "model.json") if (out / n).exists()]
        if statetx_files or not ((out / "config.yaml").is_file()
                                 and (out / "checkpoints").is_dir()):
            raise ConfigError(f"{out} holds files that are not an arc-state run"
                              + (f" ({', '.join(statetx_files)}: a statetx run or model)"
                                 if statetx_files else " (config.yaml and checkpoints/)")
                              + ", and overwrite=True replaces the folder whole; choose a new "
                              "folder.")
    v = model.vocab_
    hp = hyper_parameters(model)
    ckpt = {"state_dict": arc_state_dict(model.network_, int(model.cell_set_len_)),
            "hyper_parameters": hp, "hparams_name": "kwargs",
            "pytorch-lightning_version": "2.5.0", "epoch": 0, "global_step": hp["max_steps"],
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    origin = statetx_origin(model)
    if origin is not None:  # (an entry Lightning and arc-state ignore; statetx's importer
        ckpt[STATETX_ORIGIN_KEY] = origin  # reads it for the licence line)
    vectors = (v.pert_features if v.pert_features is not None
               else np.eye(len(v.perturbations), dtype=np.float32))
    maps = {"pert_onehot_map.pt": {str(k): torch.from_numpy(np.array(vectors[i], np.float32))
                                   for i, k in enumerate(v.perturbations)}}
    for stem, labels in (("cell_type_onehot_map", v.cell_types), ("batch_onehot_map", v.batches)):
        eye = torch.eye(max(1, len(labels)))
        maps[f"{stem}.torch"] = {str(k): eye[i].clone() for i, k in enumerate(labels)}
    var_dims = {"input_dim": c.input_dim, "output_dim": c.output_dim,
                "gene_dim": hp["gene_dim"], "hvg_dim": hp["hvg_dim"], "pert_dim": c.pert_dim,
                "batch_dim": len(v.batches), "gene_names": hp["gene_names"],
                "pert_names": [str(p) for p in v.perturbations],
                # (not arc-state's: the input features' names, for statetx to read them back)
                "statetx_input_names": [str(g) for g in model.var_names_]}
    cfg = config_of_model(model, out)
    kwargs = cfg.setdefault("model", {}).setdefault("kwargs", {})
    kwargs.update({k: hp[k] for k in list(kwargs) if k in hp})  # (the importer cross-checks)
    kwargs["transformer_backbone_key"] = hp["transformer_backbone_key"]
    kwargs["transformer_backbone_kwargs"] = hp["transformer_backbone_kwargs"]

    def write(tmp: Path) -> None:  # (a temporary folder, put in place of ``out`` when complete)
        (tmp / "checkpoints").mkdir()
        torch.save(ckpt, tmp / "checkpoints" / "final.ckpt")
        for name, table in maps.items():
            torch.save(table, tmp / name)
        (tmp / "var_dims.pkl").write_bytes(pickle.dumps(var_dims))
        (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    return atomic_folder(out, write)


def statetx_origin(model: StateTransitionModel) -> dict[str, Any] | None:
    """Who trained the exported weights, for the importer's licence line: statetx (its
    version, and the ``model.kwargs.init_from`` checkpoint its run started from, when its run
    folder records one), or for a model imported from an arc-state run, that run's own record
    (None: arc-state trained them, and their licence stays)."""
    arc = getattr(model, "arc_import_", None)
    if arc:
        origin = (arc.get("provenance") or {}).get(STATETX_ORIGIN_KEY)
        return dict(origin) if isinstance(origin, dict) else None
    from statetx import __version__

    init_from = None
    run = getattr(model, "run_dir_", None)
    if run is not None and (Path(run) / "config.yaml").is_file():
        try:
            kwargs = (read_config(Path(run) / "config.yaml").get("model") or {}).get("kwargs")
            init_from = (kwargs or {}).get("init_from")
        except (ConfigError, OSError, AttributeError):
            pass
    batches = getattr(model, "trained_batches_", None)  # (read back by from_arc_state)
    return {"trained_by": "statetx", "statetx_version": __version__,
            "init_from": str(init_from) if init_from else None,
            **({"trained_batches": list(batches)} if batches is not None else {})}


def unexportable(model: StateTransitionModel) -> list[str]:
    """Why arc-state could not rebuild this model's network (empty when it can)."""
    c = model.network_config_
    why = []
    if c.pert_skip != "none":
        why.append(f"it has statetx's per-perturbation skip (pert_skip={c.pert_skip!r}, the "
                   "'small' preset's); train a reference preset such as state_sm to export")
    if c.residual_space != "hidden":
        why.append(f"its residual is taken in the {c.residual_space} space (arc-state adds it "
                   "in the hidden space)")
    if c.confidence_token:
        why.append("it has a confidence token")
    if c.output_space == "all" and not c.predict_residual:
        why.append("arc-state builds the output space 'all' with its residual block "
                   "(final_down_then_up), which this model (predict_residual=False) lacks")
    if c.backbone == "llama" and not (
            (c.attention == "bidirectional" and c.rope is None)
            or (c.attention == "causal" and c.rope == ROPE_THETA)):
        why.append(f"arc-state's Llama backbone is bidirectional without positions or causal "
                   f"with rotary positions (theta {ROPE_THETA:g}), not {c.attention} with "
                   + ("no positions" if c.rope is None else f"rope {c.rope:g}"))
    if c.backbone == "gpt2" and (c.attention != "causal" or c.rope is not None):
        why.append("arc-state's GPT-2 backbone is causal without rotary positions")
    embed_key = model.columns_.embed_key
    reference = "relu" if (embed_key in (None, "X_hvg") or c.gene_dim == 0) else "none"
    if c.output_activation != reference:
        why.append(f"its output activation ({c.output_activation}) differs from the one "
                   f"arc-state applies to this model ({reference}: ReLU unless the input is an "
                   "embedding and a gene decoder follows); train it with model_kwargs="
                   f"{{'output_activation': '{reference}'}} to export")
    return why


def output_genes(model: StateTransitionModel) -> list[str]:
    """The genes of the model's gene-space output (decoded genes, else the direct output's
    genes for an expression model; none for an embedding without a decoder)."""
    if model.network_config_.gene_dim and getattr(model, "gene_names_", None):
        return [str(g) for g in model.gene_names_]
    if model.columns_.embed_key in (None, "X_hvg"):
        return [str(g) for g in model.var_names_]
    return []


def arc_state_dict(network: torch.nn.Module, positions: int) -> dict[str, torch.Tensor]:
    """The network's weights under arc-state's names: GPT-2 projections transposed back to
    Conv1D layout, and the backbone's zero token table (and, GPT-2, its ``positions``-row
    position table: arc-state sizes it by the set length) added."""
    c = network.config
    sd = {k: conv1d_layout(k, v).detach().cpu().contiguous().clone()
          for k, v in network.state_dict().items()}
    if c.backbone == "llama":
        sd["transformer_backbone.embed_tokens.weight"] = torch.zeros(TOKEN_ROWS, c.hidden_dim)
    else:
        sd["transformer_backbone.wte.weight"] = torch.zeros(TOKEN_ROWS, c.hidden_dim)
        sd["transformer_backbone.wpe.weight"] = torch.zeros(positions, c.hidden_dim)
    return sd


def hyper_parameters(model: StateTransitionModel) -> dict[str, Any]:
    """The ``hyper_parameters`` arc-state 0.11.1 writes for this network and its data (the keys
    of arc-checkpoints.md §4; training-only keys with the values of this fit)."""
    c, cols, v = model.network_config_, model.columns_, model.vocab_
    s = int(model.cell_set_len_)
    settings = getattr(model, "train_settings_", {}) or {}
    if c.backbone == "llama":
        key = "llama"
        kwargs: dict[str, Any] = {
            "bidirectional_attention": c.attention == "bidirectional",
            "max_position_embeddings": s, "hidden_size": c.hidden_dim,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps, "use_cache": False,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "vocab_size": TOKEN_ROWS, "n_positions": s}
    else:
        key = "GPT2"
        kwargs = {"max_position_embeddings": s, "n_positions": s + 1,  # (as arc-state's runs)
                  "hidden_size": c.hidden_dim,
                  "n_embd": c.hidden_dim, "n_layer": c.n_layers, "n_head": c.n_heads,
                  "n_inner": c.intermediate_size, "layer_norm_epsilon": c.norm_eps,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "use_cache": False,
                  "vocab_size": TOKEN_ROWS}
    genes = output_genes(model)
    decoder = c.gene_dim > 0
    gene_dim = c.gene_dim if decoder else c.output_dim
    loss_kwargs = model.loss_kwargs or {}
    dims = list(c.decoder_hidden_dims) or [1024, 1024, 512]  # (arc-state's default widths)
    return {
        "input_dim": c.input_dim, "output_dim": c.output_dim, "pert_dim": c.pert_dim,
        "batch_dim": len(v.batches), "hidden_dim": c.hidden_dim, "gene_dim": gene_dim,
        "hvg_dim": c.input_dim if cols.embed_key == "X_hvg" else gene_dim, "gene_names": genes,
        "embed_key": cols.embed_key, "output_space": c.output_space,
        "control_pert": v.control_pert, "cell_set_len": s,
        "n_encoder_layers": c.n_encoder_layers, "n_decoder_layers": c.n_decoder_layers,
        "use_basal_projection": c.use_basal_projection, "predict_residual": c.predict_residual,
        "activation": c.activation, "dropout": c.dropout, "batch_encoder": c.batch_encoder,
        "gene_decoder_bool": decoder,
        "decoder_cfg": {"latent_dim": c.output_dim, "gene_dim": gene_dim, "hidden_dims": dims,
                        "dropout": c.decoder_dropout, "residual_decoder": c.residual_decoder},
        "decoder_hidden_dims": dims,
        "residual_decoder": c.residual_decoder,
        "transformer_backbone_key": key, "transformer_backbone_kwargs": kwargs,
        "confidence_token": False, "use_batch_token": False,
        "basal_mapping_strategy": model._pairing(),
        "loss": model.loss, "distributional_loss": model.loss,
        "blur": float(loss_kwargs.get("blur", 0.05)),
        "mmd_num_chunks": int(loss_kwargs.get("mmd_num_chunks", 1)),
        "randomize_mmd_chunks": bool(loss_kwargs.get("randomize_mmd_chunks", False)),
        "lr": float(settings.get("lr", model.lr or 1e-4)),
        "max_steps": int(settings.get("max_steps", model.max_steps or 0)),
        "batch_size": int(settings.get("batch_size", model.batch_size or 16)),
        "train_seed": int(model.seed), "weight_decay": float(model.weight_decay),
        "gradient_clip_val": (None if model.gradient_clip_val is None
                              else float(model.gradient_clip_val)),
        "gradient_accumulation_steps": int(model.gradient_accumulation_steps),
        "val_freq": int(settings.get("val_freq", model.val_freq or 2000)),
        "ckpt_every_n_steps": int(model.ckpt_every_n_steps),
        "init_from": None, "freeze_pert_backbone": False, "finetune_vci_decoder": False,
        "lora": {"enable": False}, "transformer_decoder": False, "mask_attn": False,
        "use_effect_gating_token": False, "softplus": True, "loss_fn": "mse",
        "devices": 1, "strategy": "auto", "wandb_track": False, "use_mfu": False,
    }
