"""The ``statetx`` command line (cli.md): arc-state / cell-load / cell-eval commands, statetx-style.

``statetx tx train KEY=VALUE ...`` trains (Hydra-style overrides, see :mod:`statetx.run`);
``tx predict`` evaluates a run's test split; ``tx infer`` predicts on any AnnData;
``tx preprocess_train`` / ``tx preprocess_infer`` / ``tx split``; ``filter_on_target_knockdown``;
``evaluate run|baseline|score|prep`` (cell-eval compatible); ``import-arc``; ``info``; ``demo``.
``train``, ``predict``, ``infer``, ``preprocess_train``, ``preprocess_infer`` and ``split`` also
work without the ``tx`` prefix. Every multi-word flag accepts ``--dash-case`` and
``--underscore_case``. Exit status: 0 success, 2 usage or configuration error, 1 other failures;
errors print one line (``--debug`` shows the traceback).

Only the standard library is imported at module import time: torch, anndata and scanpy are
imported inside the commands, so ``--help`` and argument errors return at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from statetx._context import command_line
from statetx._options import ARCH_CHOICES, BATCH_COLS
from statetx.errors import ConfigError, DataError, SplitConfigError, StatetxError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
CELLTYPE_COLS = ("cell_type", "celltype", "cellType", "ctype", "celltype_col")


class UsageError(StatetxError):
    """A command-line usage problem (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# argparse helpers
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a shortened flag is an error, not a guess (--num_hvg is not --num-hvgs)
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # one line + usage, exit 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _flag(p: argparse.ArgumentParser, *names: str, **kw: Any) -> argparse.Action:
    """Add an option under every given name plus the other spelling of multi-word long names."""
    spellings: list[str] = []
    for n in names:
        spellings.append(n)
        if n.startswith("--") and ("-" in n[2:] or "_" in n[2:]):
            alt = "--" + (n[2:].replace("-", "_") if "-" in n[2:] else n[2:].replace("_", "-"))
            if alt not in spellings and alt not in names:
                spellings.append(alt)
    return p.add_argument(*spellings, **kw)


def _pert_features_flag(p: argparse.ArgumentParser) -> None:
    _flag(p, "--pert-features", metavar="FILE",
          help="models trained with perturbation features: vectors for perturbations without "
          "training cells (e.g. unseen genes), as a .pt / .safetensors / .npz / .csv table "
          "name -> vector")


def _untrained_flag(p: argparse.ArgumentParser) -> None:
    _flag(p, "--untrained-perturbation", default="control", choices=["control", "as_is"],
          help="one-hot perturbations of the model that had no training cells (e.g. held out): "
          "predicted as the control (default; their never-trained embedding would add a random "
          "effect), or with that embedding, as arc-state does")


def _matmul_flag(p: argparse.ArgumentParser) -> None:
    _flag(p, "--matmul-precision", default="highest", metavar="{highest,high,medium}",
          help="fp32 matrix products of the network: highest (default, full fp32), high, medium "
          "(bf16 products on CPUs with AMX, TF32 on GPUs: faster, outputs within ~0.5 %% RMS)")


def _sub(sp: Any, name: str, help: str, aliases: Sequence[str] = (), **kw: Any) -> _Parser:
    alts = list(aliases)
    for n in [name, *aliases]:
        other = n.replace("_", "-") if "_" in n else n.replace("-", "_")
        if other != n and other not in alts and other != name:
            alts.append(other)
    p = sp.add_parser(name, help=help, aliases=alts, description=kw.pop("description", help),
                      formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.set_defaults(parser_=p)  # error messages name this command's flags (see _cli_names)
    return p


# Python argument names whose command-line flag is spelled differently (its argparse dest)
_PYTHON_TO_FLAG = {"sets_per_pass": "batch_size", "set_len": "max_set_len",
                   "n_cells_per_pert": "virtual_cells_per_pert", "steps": "test_time_finetune",
                   "cell_type_col": "celltype_col", "cell_type_key": "celltype_col"}


def _cli_names(message: str, ns: argparse.Namespace) -> str:
    """The library's errors name Python arguments (``unknown_batch='mean'``); on the command
    line, add the flag or configuration key that sets each of them."""
    import re

    # (a dotted name, training.max_steps=, is a configuration key already)
    names = dict.fromkeys(re.findall(r"(?<![\w.])([a-z][a-z0-9_]*)=", message))
    if getattr(ns, "func", None) is cmd_train:  # the estimator's parameters: their keys
        from statetx.runconfig import PARAM_PATHS

        flags = {k: f"{v}=<value>" for k, v in PARAM_PATHS.items()}
        # (also named without '=': "control_pert 'x' is not a value", "leave embed_key unset";
        # only names with an underscore, not words such as loss or seed)
        names.update(dict.fromkeys(n for n in re.findall(
            r"(?<![\w.\[\'\"])([a-z][a-z0-9]*_[a-z0-9_]*)\b(?![\'\"\]])", message)
            if n in flags))
    else:
        names = dict.fromkeys(_PYTHON_TO_FLAG.get(n, n) for n in names)
        parser = getattr(ns, "parser_", None)
        flags = {a.dest: max(a.option_strings, key=lambda o: ("-" in o[2:], len(o)))
                 for a in (parser._actions if parser is not None else []) if a.option_strings}
    hints: list[str] = []
    for name in names:
        if name in flags and flags[name] not in message:
            hints.append(flags[name])
    if "statetx.pp.preprocess_train" in message:  # the command that does the same
        hints.append("statetx tx preprocess_train --adata IN --output OUT")
    return f"{message} [command line: {', '.join(hints)}]" if hints else message


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

TRAIN_EPILOG = """\
overrides (key=value, any order; `+key=value` accepted; the preset is applied first):
  data.kwargs.toml_config_path=FILE   split file (required)
  data.kwargs.{pert_col,cell_type_key,batch_col,control_pert,embed_key,output_space,
               basal_mapping_strategy,perturbation_features_file,should_yield_control_cells,...}
  training.{max_steps,batch_size,lr,weight_decay,val_freq,ckpt_every_n_steps,gradient_clip_val,
            gradient_accumulation_steps,train_seed,optimizer,lr_schedule,warmup_steps,
            precision,matmul_precision,keep_step_checkpoints,early_stopping_patience,device,...}
  model=PRESET                        state, state_sm, state_lg, tahoe_best, pertsets, tiny, ...
  model.kwargs.{cell_set_len,hidden_dim,n_encoder_layers,n_decoder_layers,dropout,attention,
                rope,batch_encoder,loss,init_from,freeze_pert_backbone,...}
  model.kwargs.transformer_backbone_kwargs.{hidden_size,intermediate_size,num_hidden_layers,
                num_attention_heads,num_key_value_heads,head_dim,bidirectional_attention,...}
  wandb.{project,entity,tags,group,notes,dir}  use_wandb  output_dir  name  overwrite
  resume=auto|force  dry_run=true
values: true/false, null, 12, 1e-4, [a,b], "quoted text"; run directory = output_dir/name.

example:
  statetx tx train data.kwargs.toml_config_path=config.toml data.kwargs.pert_col=gene \\
      data.kwargs.control_pert=non-targeting training.max_steps=40000 model=state_sm \\
      output_dir=output name=my_experiment
"""


def build_parser() -> _Parser:
    """The complete argument parser (cheap: no heavy imports)."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    p = _Parser(prog="state" if called == "state" else "statetx",
                description="State Transition perturbation models (statetx).",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="`statetx COMMAND --help` describes a command. --debug (anywhere) "
                       "prints tracebacks.")
    p.add_argument("--version", action="store_true", help="print the statetx version and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sp = p.add_subparsers(dest="command", metavar="COMMAND")
    tx = _sub(sp, "tx", "State Transition commands (train, predict, infer, ...)")
    txs = tx.add_subparsers(dest="tx_command", metavar="TX_COMMAND")
    tx.set_defaults(func=lambda a: _missing_subcommand(tx))
    for target in (txs, sp):
        _add_tx_commands(target, shortcut=target is sp)
    _add_filter(sp)
    _add_evaluate(sp)
    _add_import_arc(sp)
    _add_export_arc(sp)
    _add_info(sp)
    _add_demo(sp)
    _add_emb(sp)
    return p


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _add_tx_commands(sp: Any, shortcut: bool) -> None:
    tag = " (shortcut of `statetx tx ...`)" if shortcut else ""
    # train
    t = _sub(sp, "train", "train an ST model from key=value overrides" + tag,
             epilog=TRAIN_EPILOG)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    t.add_argument("--config", metavar="FILE.yaml", help="base configuration (e.g. a run's "
                   "config.yaml); overrides still apply")
    _flag(t, "--print-config", action="store_true",
          help="print the resolved configuration and exit")
    _flag(t, "--list-keys", action="store_true", help="list every configuration key and exit")
    t.set_defaults(func=cmd_train)
    # predict
    pr = _sub(sp, "predict", "predict and evaluate the test split of a training run" + tag)
    _flag(pr, "--output-dir", required=True, metavar="RUN_DIR", help="the run directory")
    pr.add_argument("--checkpoint", help="file name in checkpoints/ or a path (default "
                    "final.ckpt, else last.ckpt)")
    pr.add_argument("--profile", default="full", choices=list(PROFILE_HELP),
                    help=PROFILE_HELP_TEXT + " (tx predict always leaves out "
                    "pearson_edistance and clustering_agreement, as arc-state's does)")
    _flag(pr, "--predict-only", action="store_true", help="write AnnData outputs, skip metrics")
    _flag(pr, "--test-time-finetune", type=int, default=0, metavar="STEPS",
          help="before predicting, fine-tune this many steps (Adam, lr 1e-5) on sets of the "
          "split's control cells only, as arc-state (default 0: off)")
    pr.add_argument("--toml", help="re-split with another split file")
    _flag(pr, "--skip-adatas", action="store_true", help="do not write adata_pred/real.h5ad")
    _flag(pr, "--shared-only", action="store_true",
          help="only perturbations present in both the training split and the evaluated split")
    _flag(pr, "--eval-train-data", action="store_true", help="evaluate the training split")
    pr.add_argument("--pseudobulk", action="store_true",
                    help="keep running means per (cell type, perturbation) instead of cells: no "
                    "per-cell prediction or real matrix is built (the split's input cells are "
                    "still read); the AnnData outputs hold one row per group and only metrics "
                    "defined on pseudobulks are computed (no DE)")
    pr.add_argument("--split", default="test", choices=["test", "val", "train"],
                    help="which part of the split to predict and evaluate (default test; "
                    "--eval-train-data is --split train)")
    _flag(pr, "--num-threads", type=int, default=None,
          help="DE threads (default: the CPUs available to the process)")
    _flag(pr, "--data-root", metavar="DIR", help="directory that now holds the run's data files")
    _pert_features_flag(pr)
    _untrained_flag(pr)
    pr.add_argument("--seed", type=int, default=None,
                    help="seed of the control draws (default: the run's training seed)")
    _matmul_flag(pr)
    pr.set_defaults(func=cmd_predict)
    # infer
    inf = _sub(sp, "infer", "predict perturbation responses for the cells of an AnnData" + tag)
    _flag(inf, "--model-dir", required=True, help="statetx run / model directory or an "
          "arc-state run directory")
    inf.add_argument("--checkpoint", help="file name in checkpoints/ or a path")
    inf.add_argument("--adata", required=True, help="input .h5ad")
    inf.add_argument("--output", help="output .h5ad or .npy (default: <adata stem>_simulated.h5ad "
                     "next to the input file)")
    _flag(inf, "--output-dir", help="write <dir>/<adata stem>_simulated.h5ad")
    _flag(inf, "--embed-key", help="obsm key of the input (default: the model's)")
    _flag(inf, "--pert-col", help="perturbation column (default: the model's)")
    _flag(inf, "--celltype-col", "--cell-type-col", help="cell-type column (default: the "
          "model's, then auto-detect); none: all cells one context (controls of any cell "
          "type)")
    inf.add_argument("--celltypes", action="append", help="only these cell types (comma list "
                     "or repeated)")
    _flag(inf, "--batch-col", help="batch column (default: the model's, then auto-detect)")
    _flag(inf, "--control-pert", help="control label (default: the model's)")
    inf.add_argument("--seed", type=int, default=None,
                     help="seed of the control draws (default: the model's training seed)")
    _flag(inf, "--max-set-len", type=int, help="cells per set (default: the model's)")
    _flag(inf, "--batch-size", type=int, help="sets per forward pass (memory only)")
    inf.add_argument("--tsv", help="table (perturbation, num_cells): add that many virtual cells")
    _flag(inf, "--all-perts", action="store_true",
          help="simulate every perturbation of the model from control cells")
    _flag(inf, "--virtual-cells-per-pert", type=int, help="virtual cells per perturbation and "
          "context with --all-perts (default: the context's number of controls)")
    _flag(inf, "--min-cells", type=int, help="clone cells up to this many per group")
    _flag(inf, "--max-cells", type=int, help="subsample groups down to this many cells")
    inf.add_argument("--quiet", action="store_true", help="print nothing but errors")
    inf.add_argument("--windows", default="balanced", choices=["balanced", "reference"],
                     help="how a group is cut into sets: sets of nearly equal size (default), or "
                     "chunks of the set length and a remainder, as arc-state")
    _flag(inf, "--basal-pool", choices=["cell_type", "batch", "all"],
          help="where basal control cells are drawn from (default: as the model trained)")
    _flag(inf, "--basal", default="sampled", choices=["sampled", "self"],
          help="each cell's basal state: drawn from the controls (default, as arc-state), or "
          "the cell itself ('these cells, perturbed': relabel control cells; no controls "
          "needed; virtual cells start from the control they clone)")
    _flag(inf, "--basal-fallback", default="error", choices=["error", "all_controls"],
          help="a cell type without control cells: an error (default), or draw from every "
          "control")
    _flag(inf, "--unknown-perturbation", default="error", choices=["error", "control", "zeros"],
          help="perturbation labels outside the model's vocabulary: an error listing them "
          "(default), predicted as the control, or as a perturbation vector of zeros")
    _untrained_flag(inf)
    _pert_features_flag(inf)
    _flag(inf, "--unknown-batch", default="error", choices=["error", "first", "mean"],
          help="batches unknown to a model with a batch encoder, or without training cells "
          "(held out): an error (default), the first trained batch, or the mean embedding of "
          "the trained batches")
    _flag(inf, "--missing-genes", default="error", choices=["error", "zero"],
          help="model genes absent from the input: an error listing them (default), or zeros")
    _flag(inf, "--gene-name-col",
          help="the input's var column of gene names (e.g. symbols next to Ensembl IDs; "
          "default: the training one; 'none': var_names)")
    _flag(inf, "--no-predict-controls", action="store_true",
          help="copy the control cells into the output instead of predicting them")
    inf.add_argument("--clip", default="auto", help="auto | none | LO,HI")
    inf.add_argument("--layout", default="statetx", choices=["statetx", "arc"],
                     help="statetx: a new AnnData of the predictions (default); arc: a copy of "
                     "the input with the predictions where arc-state's tx infer writes them")
    _arc_flags(inf)
    _matmul_flag(inf)
    inf.set_defaults(func=cmd_infer)
    # preprocess_train
    pt = _sub(sp, "preprocess_train", "normalise, log1p and select HVGs (writes X_hvg)" + tag)
    pt.add_argument("--adata", required=True, help="input .h5ad (raw counts in X, or in "
                    "--layer)")
    pt.add_argument("--output", required=True, help=".h5ad to write: X normalised and "
                    "log1p-transformed, obsm['X_hvg'] the HVG columns")
    _flag(pt, "--num-hvgs", type=int, required=True,
          help="number of highly variable genes to select (the width of X_hvg)")
    _flag(pt, "--target-sum", type=float, help="default: median of the cell totals")
    pt.add_argument("--flavor", default="seurat", choices=["seurat", "cell_ranger", "seurat_v3"],
                    help="scanpy's HVG method (default seurat; seurat_v3 works on the counts "
                    "and needs scikit-misc)")
    pt.add_argument("--layer", help="take counts from this layer")
    _flag(pt, "--already-normalized", action="store_true", help="X is log1p already: HVGs only")
    _flag(pt, "--include-genes", help="comma-separated genes always added to the HVGs")
    pt.set_defaults(func=cmd_preprocess_train)
    # preprocess_infer
    pi = _sub(sp, "preprocess_infer", "build a control template (perturbed labels on control "
              "expression)" + tag)
    pi.add_argument("--adata", required=True, help="input .h5ad (perturbed and control cells)")
    pi.add_argument("--output", required=True, help="the control template .h5ad to write")
    _flag(pi, "--control-condition", required=True, help="control label in --pert-col")
    _flag(pi, "--pert-col", required=True, help="obs column of the perturbation labels")
    pi.add_argument("--seed", type=int, default=42, help="seed of the control draws (default 42)")
    _flag(pi, "--embed-key", help="replace only this representation (X, obsm key or layer)")
    _flag(pi, "--celltype-col", help="draw controls within this column's groups (default: "
          "auto-detect; 'none' = global pool)")
    _flag(pi, "--match-batch", action="store_true", help="also match the batch (--batch-col)")
    _flag(pi, "--batch-col", help="batch column for --match-batch (default: auto-detect)")
    pi.set_defaults(func=cmd_preprocess_infer)
    # split
    s = _sub(sp, "split", "validate a split file against its data and print the summary" + tag)
    s.add_argument("--toml", required=True, help="the split file (TOML) to check")
    _flag(s, "--pert-col", default="gene", help="obs column of the perturbation labels "
          "(default gene)")
    _flag(s, "--cell-type-key", default="cell_type", help="obs column of the cell types "
          "(default cell_type)")
    _flag(s, "--batch-col", default=None, help="obs column of the batches (default: none, one "
          "batch)")
    _flag(s, "--control-pert", default=None, help="control label (default: 'non-targeting' "
          "or 'DMSO_TF', when exactly one of them is present)")
    _flag(s, "--embed-key", default=None, help="obsm key of the input (default: X)")
    _flag(s, "--output-space", default="all", choices=ARCH_CHOICES["output_space"],
          help="what the model would predict: gene, all or embedding (default all)")
    _flag(s, "--allow-counts", action="store_true", help="accept count-scale expression with "
          "output space 'all' (as data.kwargs.allow_counts=true for tx train)")
    s.set_defaults(func=cmd_split)
    # combination features
    cf = _sub(sp, "combination_features", "perturbation features for combined labels (A+B): "
              "multi-hot over the singles, or sums of a model's vectors" + tag)
    cf.add_argument("--adata", required=True, help="h5ad whose perturbation labels get vectors")
    cf.add_argument("--output", "-o", required=True,
                    help="the table to write: .pt, .safetensors, .npz or .csv (for "
                    "data.kwargs.perturbation_features_file= or --pert-features)")
    _flag(cf, "--pert-col", help="obs column of the labels (default: the model's, else gene)")
    _flag(cf, "--control-pert", help="the control label: zeros, and no perturbation in A+ctrl "
          "(default: the model's)")
    cf.add_argument("--sep", default="+", help="what joins the parts of a label (default +)")
    _flag(cf, "--model-dir", help="a statetx run or model trained with perturbation features: "
          "labels get the sum of its vectors of their parts (new pairs for tx infer)")
    cf.set_defaults(func=cmd_combination_features)


def _add_filter(sp: Any) -> None:
    f = _sub(sp, "filter_on_target_knockdown", "keep CRISPRi perturbations/cells whose target "
             "is knocked down (cell-load compatible)", aliases=["filter-knockdown"])
    f.add_argument("input", metavar="INPUT", help="input .h5ad")
    f.add_argument("-o", "--output", required=True, help="filtered .h5ad to write")
    _flag(f, "--perturbation-column", default="gene",
          help="obs column of the perturbation labels (default gene)")
    _flag(f, "--control-label", default="non-targeting",
          help="control label in that column (default non-targeting)")
    _flag(f, "--residual-expression", type=float, default=0.30,
          help="keep a perturbation whose target's mean expression is below this fraction "
          "of the controls' mean (default 0.30)")
    _flag(f, "--cell-residual-expression", type=float, default=0.50,
          help="then keep a cell whose target expression is below this fraction of the "
          "controls' mean (default 0.50)")
    _flag(f, "--min-cells", type=int, default=30,
          help="then drop perturbations with fewer cells left (default 30)")
    f.add_argument("--layer", help="layer to read expression from (default X)")
    _flag(f, "--var-gene-name",
          help="var column with gene names (default: 'gene_name' when var has it, else "
          "var_names; a column given here must exist)")
    f.add_argument("--verbose", action="store_true",
                   help="print the cells and perturbations each stage removed")
    f.add_argument("--preprocess", action="store_true",
                   help="normalize_total(1e4) + log1p after filtering")
    _flag(f, "--on-unmatched", default="drop", choices=["drop", "keep", "error"],
          help="perturbation labels that match no gene: dropped (default, reported), kept "
          "unfiltered, or an error")
    f.add_argument("--report", help="write the per-perturbation report (CSV; the per-stage "
                   "summary goes next to it, <name>_stages.csv)")
    f.set_defaults(func=cmd_filter)


def _add_evaluate(sp: Any) -> None:
    ev = _sub(sp, "evaluate", "cell-eval compatible evaluation (run, baseline, score, prep)")
    evs = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ev.set_defaults(func=lambda a: _missing_subcommand(ev))
    r = _sub(evs, "run", "evaluate a prediction against real data")
    _flag(r, "-ap", "--adata-pred", required=True, help="predicted cells (.h5ad)")
    _flag(r, "-ar", "--adata-real", required=True, help="real cells (.h5ad)")
    _flag(r, "-dp", "--de-pred", help="DE table of the prediction (cell-eval's CSV layout) "
          "instead of computing it; it must cover the evaluated perturbations")
    _flag(r, "-dr", "--de-real", help="DE table of the real cells, likewise")
    _flag(r, "--control-pert", default=None, help="control label (default: the one statetx "
          "recorded in the prediction, else non-targeting)")
    _flag(r, "--pert-col", default=None, help="perturbation column (default: the one statetx "
          "recorded in the prediction, else target_gene)")
    _flag(r, "--celltype-col", help="score each value of this obs column (cell type) separately "
          "(default: all cells pooled)")
    _flag(r, "--embed-key", help="obsm key of an embedding for the discrimination scores (l2, "
          "cosine)")
    _flag(r, "-o", "--outdir", default="./cell-eval-outdir",
          help="folder for the results: results.csv, agg_results.csv, DE tables "
          "(default ./cell-eval-outdir)")
    _flag(r, "--num-threads", type=int, default=None, help="DE threads (default: the CPUs "
          "available to the process)")
    _flag(r, "--allow-discrete", action="store_true", help="use integer (count) or >= 15 values "
          "as they are (default: integer X is normalised and log1p-transformed)")
    _flag(r, "--counts-target", default="shared", choices=["shared", "own_median"],
          help="the total integer counts are normalised to: shared (default: both files on one "
          "scale) or own_median (each file to its own median total, as cell-eval)")
    r.add_argument("--profile", default="full", choices=list(PROFILE_HELP),
                   help=PROFILE_HELP_TEXT)
    _flag(r, "--skip-metrics", help="comma-separated metric names")
    r.add_argument("--ceiling", action="store_true",
                   help="also score real against real (random halves of each perturbation): "
                   "ceiling_results.csv, agg_ceiling_results.csv and the model's fraction of it")
    _flag(r, "--ceiling-seed", type=int, default=None, help="seed of the halves (default 0)")
    _flag(r, "--cpm-filter", type=float, default=None, help="cell-eval's option; not supported "
          "yet (refused when given)")
    r.add_argument("--epsilon", type=float, default=0.0, help="pseudocount of the DE fold "
                   "changes (cell-eval's, default 0)")
    _flag(r, "--batch-size", type=int, default=None, help="accepted; memory only")
    _flag(r, "--align-genes", action="store_true", help="reorder the prediction's genes to the "
          "real order (same genes in another order)")
    _flag(r, "--shared-only", action="store_true", help="evaluate only the perturbations in "
          "both files (the others are listed)")
    _flag(r, "--de-mode", default="pdex-0.3", choices=["pdex-0.3", "vcc-2025"],
          help="DE semantics: cell-eval 0.8.2 (default) or 2025's (global BH, clipped fold "
          "change), to reproduce Virtual Cell Challenge numbers")
    r.set_defaults(func=cmd_evaluate_run)
    b = _sub(evs, "baseline", "the cell-mean baseline (VCC)")
    b.add_argument("-a", "--adata", required=True,
                   help="real cells (.h5ad, control cells included) whose mean makes the "
                   "baseline")
    b.add_argument("-c", "--counts", help="CSV of perturbation,n_cells")
    b.add_argument("-o", "--output", default="baseline.h5ad",
                   help="baseline .h5ad to write (default baseline.h5ad)")
    b.add_argument("-O", "--output-de", "--output_de", dest="output_de", help="baseline DE CSV")
    _flag(b, "--pert-col", default=None, help="perturbation column (default: the one statetx "
          "recorded in the input, else target_gene)")
    _flag(b, "--control-pert", default=None, help="control label (default: the one statetx "
          "recorded in the input, else non-targeting)")
    _flag(b, "-t", "--num-threads", type=int, default=None,  # (-t: cell-eval's baseline)
          help="DE threads for --output-de (default: the CPUs available to the process)")
    b.set_defaults(func=cmd_evaluate_baseline)
    sc = _sub(evs, "score", "normalise metrics by the baseline's (VCC score)")
    sc.add_argument("-i", "--user-input", "--user_input", dest="user_input", required=True,
                    help="the model's agg_results.csv (evaluate run)")
    sc.add_argument("-I", "--base-input", "--base_input", dest="base_input", required=True,
                    help="the baseline's agg_results.csv (evaluate run on evaluate baseline's "
                    "output)")
    sc.add_argument("-o", "--output", default="score.csv",
                    help="CSV of the normalised scores to write (default score.csv)")
    sc.set_defaults(func=cmd_evaluate_score)
    pp = _sub(evs, "prep", "package a prediction for the Virtual Cell Challenge (a .vcc "
              "archive: zstd-compressed h5ad and a watermark)")
    pp.add_argument("-i", "--input", required=True, help="the prediction (.h5ad, log1p)")
    pp.add_argument("-g", "--genes", required=True,
                    help="gene list: one name per line (a header line is detected); the "
                    "prediction's genes are put in this order and must be the same set")
    pp.add_argument("-o", "--output", help="the .vcc archive (default: <input>.prep.vcc)")
    _flag(pp, "--pert-col", default=None, help="obs column of the perturbation labels "
          "(default: the one statetx recorded in the input, else target_gene)")
    _flag(pp, "--ntc-name", default=None, help="control label, which must be present "
          "(default: the one statetx recorded in the input, else non-targeting)")
    pp.add_argument("-e", "--encoding", type=int, default=32, choices=[32, 16],
                    help="32: float32 values (default); 16: rounded to float16 precision")
    _flag(pp, "--expected-gene-dim", type=int, default=18080,
          help="required number of genes (default 18080, the VCC's; -1: no check)")
    _flag(pp, "--max-cell-dim", type=int, default=200000,
          help="most cells allowed (default 200000, the VCC's; -1: no check)")
    pp.set_defaults(func=cmd_evaluate_prep)


# the metric sets of --profile (cell-eval 0.8.2's, and statetx's extended; tests check the names)
PROFILE_HELP = {
    "full": "every cell-eval metric (default)",
    "minimal": "overlap_at_N, precision_at_N, de_nsig_counts, pearson_delta, mse, mae, "
               "discrimination_score_l1",
    "vcc": "overlap_at_N, mae, discrimination_score_l1 (the Virtual Cell Challenge's)",
    "de": "the DE metrics",
    "anndata": "the expression metrics (no DE)",
    "pds": "discrimination_score_l1",
    "extended": "full + pearson_delta_centroid, centroid_accuracy",
}
PROFILE_HELP_TEXT = "metric set: " + "; ".join(f"{k}: {v}" for k, v in PROFILE_HELP.items())


def _arc_flags(p: argparse.ArgumentParser) -> None:
    """How an arc-state checkpoint is read (import-arc, and tx infer on an arc-state run)."""
    p.add_argument("--attention", choices=ARCH_CHOICES["attention"],
                   help="attention mode (needed for a 0.9.x Llama checkpoint, which does not "
                   "record it)")
    p.add_argument("--rope", help="none or a rotary base (e.g. 10000)")
    _flag(p, "--trust-pickle", action="store_true",
          help="allow arbitrary pickled objects (only for files you trust)")
    _flag(p, "--n-heads", type=int, help="attention heads, for a checkpoint that does not "
          "record them (the error lists the candidates)")
    _flag(p, "--n-kv-heads", type=int, help="key/value heads (default: --n-heads)")
    _flag(p, "--head-dim", type=int, help="width of a head (default: hidden size / heads)")
    _flag(p, "--no-strict", dest="strict", action="store_false", help="import although the "
          "run's files disagree (config.yaml vs checkpoint, maps vs weights): the checkpoint's "
          "values are used and each disagreement is printed")


def _arc_options(a: argparse.Namespace) -> dict[str, Any]:
    """The arc-state reading flags as :func:`statetx.arc.load_arc_run`'s options (those given)."""
    given = {k: getattr(a, k) for k in ("n_heads", "n_kv_heads", "head_dim")
             if getattr(a, k) is not None}
    return {"rope": _rope(a), "trust_pickle": a.trust_pickle, **given,
            **({} if a.strict else {"strict": False})}


def _rope(a: argparse.Namespace) -> Any:
    """--rope as load_arc_run's ``rope`` (``...`` = not given)."""
    if a.rope is None:
        return ...
    try:
        return None if a.rope.lower() == "none" else float(a.rope)
    except ValueError:
        raise UsageError(f"--rope {a.rope}: use none or a number such as 10000.") from None


def _add_import_arc(sp: Any) -> None:
    ia = _sub(sp, "import-arc", "convert an arc-state run/checkpoint into a statetx model "
              "directory")
    ia.add_argument("run_dir", metavar="RUN_DIR")
    ia.add_argument("--checkpoint", default=None, help="default final.ckpt, else last.ckpt")
    _arc_flags(ia)
    for flag, what in (("--control-pert", "control label"),
                       ("--embed-key", "input obsm key, or none for X"),
                       ("--cell-set-len", "cells per set")):
        _flag(ia, flag, type=int if flag == "--cell-set-len" else str,
              help=f"{what} of a run that records it nowhere (checkpoint, config.yaml)")
    ia.add_argument("--out", required=True, metavar="MODEL_DIR",
                    help="statetx model directory to write (new or an earlier import)")
    ia.set_defaults(func=cmd_import_arc)


def _add_export_arc(sp: Any) -> None:
    ex = _sub(sp, "export-arc", "write a statetx run or model directory as an arc-state 0.11.1 "
              "run directory (for `state tx infer --model-dir`)")
    ex.add_argument("model_dir", metavar="MODEL", help="a statetx run or model directory")
    ex.add_argument("--checkpoint", default=None, help="of a run: final, last, best or a file "
                    "(default final.ckpt, else last.ckpt)")
    ex.add_argument("--out", required=True, metavar="RUN_DIR",
                    help="arc-state run directory to write")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    ex.set_defaults(func=cmd_export_arc)


def cmd_export_arc(a: argparse.Namespace) -> int:
    from statetx.arc_export import export_arc

    model = load_any_model(a.model_dir, a.checkpoint)
    out = export_arc(model, a.out, overwrite=a.overwrite)
    c = model.columns_
    _say(f"wrote {out} (arc-state run directory: config.yaml, var_dims.pkl, maps, "
         f"checkpoints/final.ckpt); use it with `state tx infer --model-dir {out} --checkpoint "
         f"{out}/checkpoints/final.ckpt --adata IN.h5ad --pert-col {c.pert_col}"
         + (f" --embed-key {c.embed_key}" if c.embed_key else "") + "`.")
    return 0


def _add_info(sp: Any) -> None:
    i = _sub(sp, "info", "describe a run, model directory or checkpoint")
    i.add_argument("path", metavar="PATH")
    i.set_defaults(func=cmd_info)


def _add_demo(sp: Any) -> None:
    d = _sub(sp, "demo", "offline demo on the bundled Zhao 2021 data: train a small ST with one "
             "patient held out, predict its drug response, compare with baselines")
    d.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    d.add_argument("--out", default="statetx_demo",
                   help="output folder (default statetx_demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    d.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    d.set_defaults(func=cmd_demo)


def _add_emb(sp: Any) -> None:
    e = _sub(sp, "emb", "arc-state's State Embedding commands: not part of statetx (says what "
             "to do instead)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_emb)


def cmd_emb(a: argparse.Namespace) -> int:
    raise UsageError(
        "statetx implements the State Transition model (tx ...), not the State Embedding model "
        "of arc-state's `state emb fit/transform`. Compute embeddings with arc-state in its own "
        "environment (its `state` command clashes with this one), e.g. `state emb transform "
        "... --output cells_emb.h5ad`, then train on them: data.kwargs.embed_key=X_state (or "
        "StateTransitionModel(embed_key='X_state')).")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``| head``); if so it is
    pointed at /dev/null, so that the interpreter's final flush does not fail again."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or no file: unknown
        closed = False
    if closed:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage/config error, 1 failure)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_in
    args_in = [a for a in args_in if a != "--debug"]
    parser = build_parser()
    try:
        ns, extra = parser.parse_known_args(args_in)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if ns.version:
        from statetx import __version__

        print(f"statetx {__version__}")
        return EXIT_OK
    if getattr(ns, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if extra:
        if ns.func is cmd_train and not any(e.startswith("-") for e in extra):
            ns.overrides = list(ns.overrides) + extra
        else:
            bad = " ".join(extra)
            print(f"statetx: error: unrecognized arguments: {bad}", file=sys.stderr)
            return EXIT_USAGE
    prog = "state" if argv is None and Path(sys.argv[0]).name == "state" else "statetx"
    ns.argv = [prog, *args_in]  # (the command as typed, for the run record)
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        kind = "warning" if issubclass(category, UserWarning) else category.__name__
        print(f"statetx: {kind}: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.filterwarnings("default", category=UserWarning)
        warnings.showwarning = show
        # (under torchrun every process reports its own failure: the others say which they are)
        who = "statetx" if _main_rank() else f"statetx [rank {os.environ.get('RANK')}]"
        # the command (e.g. "tx train"): its messages give the command line's form of their
        # advice (statetx._context.on_command_line)
        parser = getattr(ns, "parser_", None)
        command = " ".join(parser.prog.split()[1:]) if parser is not None else prog
        try:
            with command_line(command or prog):
                return int(ns.func(ns) or 0)
        except KeyboardInterrupt:
            print(f"{who}: interrupted", file=sys.stderr)
            return 130
        except (UsageError, ConfigError, SplitConfigError, DataError) as exc:
            if debug:
                import traceback

                traceback.print_exc()
            print(f"{who}: error: {_cli_names(str(exc), ns)}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - one clear message, traceback with --debug
            if isinstance(exc, BrokenPipeError) and _stdout_closed():
                return EXIT_FAILURE  # the reader of the output went away (| head): quietly
            if debug:
                import traceback

                traceback.print_exc()
            name = "" if isinstance(exc, StatetxError) else f"{type(exc).__name__}: "
            print(f"{who}: error: {name}{exc}" + ("" if debug else
                  " (run with --debug for the traceback)"), file=sys.stderr)
            return EXIT_FAILURE


def _say(msg: str) -> None:
    if _main_rank():  # (torchrun: one copy of each line)
        print(f"statetx: {msg}", flush=True)


def _main_rank() -> bool:
    """Not a torchrun worker other than rank 0 (which alone writes the run folder)."""
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------------------------------------
# tx train
# ---------------------------------------------------------------------------------------------


def cmd_train(a: argparse.Namespace) -> int:
    from statetx import runconfig

    if a.list_keys:
        _list_keys()
        return EXIT_OK
    # (the configuration is checked before the data and model code is imported: a mistyped
    # key is said at once)
    res = runconfig.resolve(a.overrides, a.config)
    plan = runconfig.plan_training(res, check_data=not a.print_config)
    if a.print_config:
        sys.stdout.write(runconfig.dump_config(plan.config))
        return EXIT_OK
    from statetx import rundir as R
    from statetx.run import estimator_class

    for note in plan.notices:
        _say(note)
    cfg, p = plan.config, plan.params
    m = cfg["model"]["kwargs"]
    _say(f"run directory {plan.run_dir}")
    _say(f"split file {plan.toml}")
    _say(f"columns: pert_col={p['pert_col']!r}, cell_type_key={p['cell_type_key']!r}, "
         f"batch_col={p['batch_col']!r}, control_pert="
         + (repr(p["control_pert"]) if p["control_pert"] else "auto-detect")
         + f"; input {p['embed_key'] or 'X'}, output_space={p['output_space']!r}")
    _say(f"model {cfg['model']['name']} (cell_set_len {m['cell_set_len']}, hidden_dim "
         f"{m['hidden_dim']}, attention {m['attention']}, rope {m['rope']}); "
         f"max_steps {p['max_steps']}, batch_size {p['batch_size']} sets, lr {p['lr']:g}; "
         f"precision {p['precision']}, matmul_precision {p['matmul_precision']}, "
         f"device {p['device']}")
    from statetx.model import StateTransitionModel

    # option errors before the run folder is touched (a dry run may check a GPU job elsewhere)
    StateTransitionModel(**p)._check_params(check_device=not cfg["dry_run"])
    if cfg["dry_run"]:
        return _dry_run(plan)
    main_rank = _main_rank()  # torchrun: the other ranks only read the run folder
    # the folders this command creates (the run's, and output_dir's that were not there)
    created = [d for d in (plan.run_dir, *plan.run_dir.parents) if not d.exists()]
    # the run's record as it was: put back if this attempt fails its checks (e.g. on resume)
    saved = {n: (plan.run_dir / n).read_bytes() for n in (R.CONFIG_FILE, R.RUN_INFO_FILE)
             if (plan.run_dir / n).is_file()}
    try:
        resume = R.start_run(plan, a.argv) if main_rank else R.resume_point(plan)
    except R.RunComplete as done:
        _say(str(done))
        return EXIT_OK
    if plan.replaced is not None and plan.init_from:  # init_from inside the run set aside
        src = Path(plan.init_from).resolve()
        if src.is_relative_to(plan.run_dir.resolve()):
            plan.init_from = str(plan.replaced / src.relative_to(plan.run_dir.resolve()))
    started = False
    # (a job scheduler's or torchrun's SIGTERM unwinds, so that a replaced run comes back)
    from statetx._utils import sigterm_unwinds

    restore_sigterm = sigterm_unwinds() if plan.replaced is not None else None
    try:
        cls = estimator_class(None if resume else plan.init_from, plan.freeze_backbone,
                                attention=plan.init_attention)
        model = cls(**p)
        run = R.ManagedRun(cfg, None if plan.replaced is None
                           else lambda: R.finish_replacement(plan, True))
        t0 = time.perf_counter()
        try:
            model._fit_run(run, None, plan.toml, dataset_name=None, output_dir=plan.run_dir,
                           resume_from=resume, force_resume=cfg["resume"] == "force")
        except Exception:
            # the split file or the data failed (validation, an unreadable file) before
            # training logged anything: do not leave a run directory without checkpoints or
            # metrics behind (one that existed before is kept; a run that trained a while keeps
            # its metrics.csv to look at)
            if not main_rank:
                raise
            if created and not any((plan.run_dir / n).exists()
                                   for n in (R.CHECKPOINT_DIR, "metrics.csv")):
                import shutil

                shutil.rmtree(plan.run_dir, ignore_errors=True)
                for folder in created[1:]:  # (empty: made for this run only)
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            elif plan.replaced is None:
                for name, data in saved.items():
                    _atomic(plan.run_dir / name, lambda p, d=data: Path(p).write_bytes(d))
            raise
        started = True
    finally:
        R.finish_replacement(plan, started or R.has_checkpoints(plan.run_dir))
        if restore_sigterm is not None:
            restore_sigterm()
    seconds = time.perf_counter() - t0
    if not main_rank:
        return EXIT_OK
    R.finish_run(plan.run_dir, model, model.training_time_)  # (earlier segments included)
    hist = model.history_
    last = hist.iloc[-1].to_dict() if len(hist) else {}
    loss = {k: f"{v:.4g}" for k, v in last.items()
            if k in ("train_loss", "val_loss", "train_loss_eval") and v == v}
    step = R.read_run_info(plan.run_dir).get("final_step")
    _say(f"training done in {seconds:.1f} s at step {step}"
         + (f" ({', '.join(f'{k} {v}' for k, v in loss.items())})" if loss else "")
         + f"; checkpoints in {plan.run_dir / 'checkpoints'}")
    return EXIT_OK


def _list_keys() -> None:
    from statetx.runconfig import ALIASES, KEYS, PRESET

    for path, k in KEYS.items():
        default = "from the preset" if k.default == PRESET else repr(k.default)
        extra = {"noeffect": "  [accepted, no effect]", "default_only": "  [only the default "
                 "is supported]", "reject_true": "  [true is not supported]"}.get(k.status, "")
        choices = f" {{{', '.join(k.choices)}}}" if k.choices else ""
        print(f"{path} ({k.kind}{choices}) = {default}{extra}")
    print("\naliases:")
    for alias, target in ALIASES.items():
        print(f"{alias} -> {target}")


def _dry_run(plan: Any) -> int:
    import torch

    from statetx.data import warn_training_scale
    from statetx.model import StateTransitionModel
    from statetx.nn import StateTransitionNetwork
    from statetx.presets import describe
    from statetx.stream import stream_settings

    model = StateTransitionModel(**plan.params)
    stream_settings(model.data_loading, model.stream_chunk_size, model.stream_buffer_chunks,
                    model.stream_max_controls)  # (its checks and notices, as fit)
    prepared = model._prepare(None, plan.toml, model._columns())  # (as fit reads it)
    _print_summary(prepared)
    warn_training_scale(prepared)  # (as fit says it)
    if model.data_loading == "stream":  # the training values: one streamed pass
        prepared.splits["train"].check_all_values()
    fit_plan = model._plan(prepared)  # (fit's preset, architecture and network)
    with torch.device("meta"):  # (its parameter count, without weights)
        network = StateTransitionNetwork(fit_plan.net_cfg)
    print(describe(fit_plan.net_cfg, network))
    if not plan.init_from:  # (fit's size advice, as a real run gives it)
        model._warn_size(fit_plan.preset, network.num_parameters(), fit_plan.n_train)
    model._warn_decoder_settings(prepared, fit_plan.net_cfg, fit_plan.preset)  # (as fit says them)
    _say("dry run: the split file and the data are valid; nothing was trained.")
    return EXIT_OK


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("h") else "s")


def _vocab_counts(v: Any) -> str:
    """'33 perturbations + the control, 4 cell types, 1 batch' (and how perturbations are
    encoded: one-hot, or a feature table)."""
    feats = v.pert_features
    return (f"{_plural(len(v.perturbations) - 1, 'perturbation')} + the control ("
            + ("one-hot" if feats is None else f"feature vectors of {feats.shape[1]} values")
            + f"), {_plural(len(v.cell_types), 'cell type')}, "
            f"{_plural(len(v.batches), 'batch')}")


def _print_summary(prepared: Any) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.max_rows", 200):
        print(prepared.summary.to_string(index=False))
    v = prepared.vocab
    _say(f"control {v.control_pert!r}; {_vocab_counts(v)}; "
         f"{prepared.input_dim} input features"
         + (f", {prepared.gene_dim} gene-space targets" if prepared.gene_dim else ""))


def cmd_split(a: argparse.Namespace) -> int:
    from statetx.config import ColumnMap

    toml = Path(a.toml)
    if not toml.is_file():
        raise UsageError(f"--toml {toml}: file not found.")
    cols = ColumnMap.build(pert_col=a.pert_col, cell_type_key=a.cell_type_key,
                           batch_col=a.batch_col, control_pert=a.control_pert,
                           embed_key=a.embed_key, output_space=a.output_space)
    _say(f"columns: pert_col={cols.pert_col!r}, cell_type_key={cols.cell_type_key!r}, "
         f"batch_col={cols.batch_col!r}, control_pert="
         + (repr(cols.control_pert) if cols.control_pert else "auto-detect")
         + f"; input {cols.embed_key or 'X'}, output_space={cols.output_space!r}")
    if a.batch_col is None:  # (tx train's default is gem_group: say what the files hold)
        from statetx._options import BATCH_COLS
        from statetx.runconfig import files_obs_columns

        columns = list(files_obs_columns(toml).values())
        found = [c for c in BATCH_COLS if columns and all(c in have for have in columns)]
        if found:
            _say(f"no --batch-col: the data are one batch here (obs has '{found[0]}': "
                 f"--batch-col {found[0]}, as tx train's data.kwargs.batch_col)")
    from statetx.data import prepare

    _print_summary(prepare(None, toml, cols, allow_counts=a.allow_counts))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# tx predict
# ---------------------------------------------------------------------------------------------


def cmd_predict(a: argparse.Namespace) -> int:
    run = Path(a.output_dir)  # (argument errors before the slow imports)
    if not run.is_dir():
        raise UsageError(f"--output-dir {run}: run directory not found.")
    if a.predict_only and a.skip_adatas:
        raise UsageError("--predict-only with --skip-adatas would write nothing.")
    import numpy as np

    from statetx.predict import check_matmul_precision
    from statetx.run import attach_data, load_run

    check_matmul_precision(a.matmul_precision)
    skip = ["pearson_edistance", "clustering_agreement"]
    if a.pseudobulk and not a.predict_only:
        from statetx.metrics.evaluate import CELL_LEVEL_METRICS, PROFILES

        skip = CELL_LEVEL_METRICS
        if not set(PROFILES[a.profile]) - set(skip):
            raise UsageError(f"--profile {a.profile} has only metrics that need the cells (DE); "
                             "with --pseudobulk use --profile anndata, pds or full.")
    model = load_run(run, a.checkpoint)
    c = model.columns_
    _say(f"run {run}; pert_col={c.pert_col!r}, cell_type_key={c.cell_type_key!r}, "
         f"control_pert={c.control_pert!r}; attention {model.network_config_.attention}; "
         f"prediction in fp32, matmul precision {a.matmul_precision}")
    split = "train" if a.eval_train_data else a.split
    prepared = attach_data(model, run, toml=a.toml, data_root=a.data_root,
                           stream=None if split != "train" else False)
    if a.toml:  # another split file: its held-out part may hold the run's training cells
        from statetx._utils import preview, warn
        from statetx.rundir import trained_in_run

        seen = trained_in_run(run, prepared, split)
        if seen:
            warn(f"--toml {a.toml}: its {split} split holds perturbed cells that this run "
                 f"trained on (the run's split.toml puts them in training), in "
                 f"{len(seen)} context(s): {preview(seen, 8)}. Their scores measure how well "
                 "the model reproduces cells it was trained on, not predictions for unseen "
                 "ones; evaluate them with the run's own split (no --toml) or a split file "
                 f"whose {split} part the run did not train on.", UserWarning)
    if a.test_time_finetune:
        _say(f"test-time fine-tuning: {a.test_time_finetune} steps on the {split} split's "
             "control cells (Adam, lr 1e-5)")
        model.finetune_on_controls(a.test_time_finetune, split, seed=a.seed)
    pred, real = model.predict_split(split, seed=a.seed, matmul_precision=a.matmul_precision,
                                     pseudobulk=a.pseudobulk, pert_features=a.pert_features,
                                     untrained_perturbation=a.untrained_perturbation)
    if a.shared_only:
        pred, real = _shared_only(model, prepared, split, pred, real)
    ck = getattr(model, "checkpoint_path_", None)
    out = run / (f"eval_{'' if split == 'test' else split + '_'}"
                 f"{ck.name if ck is not None else 'model'}"
                 + ("_pseudobulk" if a.pseudobulk else "")
                 + ("_shared" if a.shared_only else "")
                 + (f"_ttft{a.test_time_finetune}" if a.test_time_finetune else "")
                 + (f"_{Path(a.toml).stem}" if a.toml else ""))
    # cell types with control cells only (e.g. held-out ones in the training split) have
    # nothing to evaluate; checked before anything is written
    cts = real.obs[c.cell_type_key].astype(str).to_numpy()
    perturbed = set(cts[real.obs[c.pert_col].astype(str).to_numpy() != c.control_pert])
    if not perturbed and not a.predict_only:
        raise DataError(f"the {split} split has no perturbed cells to evaluate"
                        + (" after --shared-only" if a.shared_only else "")
                        + "; nothing was written (pass --predict-only to write the predictions "
                        "anyway).")
    cells = int(pred.obs["n_cells"].sum()) if a.pseudobulk else pred.n_obs
    n_perts = len(set(pred.obs[c.pert_col].astype(str)) - {c.control_pert})
    _say(f"{split} split: {cells} cells, {_plural(n_perts, 'perturbation')} and the control"
         + (f" ({pred.n_obs} pseudobulks)" if a.pseudobulk else "") + f"; writing to {out}")
    from statetx.metrics import evaluate

    agg = None

    def write(dest: Path) -> None:  # (a new folder: put in place of out's files at the end)
        nonlocal agg
        if not a.skip_adatas:
            _write_h5ad(pred, dest / "adata_pred.h5ad")
            _write_h5ad(real, dest / "adata_real.h5ad")
        if a.predict_only:
            return
        if a.pseudobulk:
            _say("--pseudobulk: metrics that need the cells (DE, pearson_edistance, "
                 "clustering_agreement) are skipped")
        if set(cts) - perturbed:
            _say(f"cell types with control cells only are not evaluated: "
                 f"{', '.join(sorted(set(cts) - perturbed))}")
        keep = np.isin(cts, sorted(perturbed))
        p, r = (pred, real) if keep.all() else (pred[keep].copy(), real[keep].copy())
        if model._output_scale == "counts" and a.pseudobulk:  # (evaluate log1p's both sides)
            _say("--pseudobulk with a count-scale model: the metrics are computed on the log1p "
                 "of mean counts, not on the mean of per-cell log1p values, and differ from the "
                 "cell-level evaluation's")
        # decoded genes in X: the l2/cosine discrimination scores use the latents (the reference
        # does so whenever embed_key is not X_hvg)
        latent = c.embed_key if c.embed_key not in (None, "X_hvg") and c.embed_key in p.obsm \
            else None
        _, agg = evaluate(p, r, pert_col=c.pert_col, control_pert=c.control_pert,
                          celltype_col=c.cell_type_key, profile=a.profile, outdir=dest,
                          skip_metrics=skip, num_threads=a.num_threads, embed_key=latent)

    _replace_files(out, EVAL_OUTPUTS, write)
    if a.predict_only:
        return EXIT_OK
    _print_agg(agg)
    _say(f"metrics written to {out} (<cell type>_results.csv, <cell type>_agg_results.csv)")
    return EXIT_OK


# the files tx predict writes into eval_<checkpoint>/ (an earlier evaluation's are replaced)
EVAL_OUTPUTS = ("adata_pred.h5ad", "adata_real.h5ad", "*_results.csv", "*_real_de.csv",
                "*_pred_de.csv", "*skipped_metrics.txt", "de_mode.txt", ".statetx_evaluate")


def _replace_files(out: Path, patterns: Sequence[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a new folder inside ``out``; when it succeeded, its files replace
    ``out``'s and the files of ``out`` matching ``patterns`` that it did not write (an earlier
    run's) are removed. A failure leaves ``out`` as it was (or absent, if it was)."""
    import shutil

    from statetx._utils import temporary_name

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out / "new")  # (inside out: one file system for the moves)
    tmp.mkdir()
    try:
        write(tmp)
        new = {f.name for f in tmp.iterdir()}
        stale = sorted({f for pattern in patterns for f in out.glob(pattern)
                        if f.name not in new})
        for name in new:
            os.replace(tmp / name, out / name)
        for f in stale:  # an earlier evaluation's files: not mixed with this one's
            f.unlink(missing_ok=True)
        if stale:
            _say(f"removed {_plural(len(stale), 'file')} of an earlier evaluation in {out} "
                 "that this one does not write")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shared_only(model: Any, prepared: Any, split: str, pred: Any, real: Any) -> tuple:
    import numpy as np

    c = model.columns_
    train = prepared.splits.get("train")
    names = np.asarray(model.vocab_.perturbations, dtype=object)
    shared = set(names[np.unique(train.pert)]) if train is not None else set()
    labels = pred.obs[c.pert_col].astype(str).to_numpy()
    keep = np.isin(labels, list(shared)) | (labels == c.control_pert)
    dropped = sorted(set(labels[~keep]))
    _say(f"--shared-only: {len(dropped)} perturbations of the {split} split are not in the "
         f"training split and are left out" + (f": {', '.join(dropped[:10])}" if dropped else ""))
    return pred[keep].copy(), real[keep].copy()


def _print_agg(agg: Any) -> None:
    import pandas as pd

    if agg is None or not len(agg):
        return
    rows = agg[agg["statistic"] == "mean"] if "statistic" in agg else agg
    with pd.option_context("display.width", 160, "display.max_columns", 12,
                           "display.float_format", "{:.4g}".format):
        print(rows.to_string(index=False))


# ---------------------------------------------------------------------------------------------
# tx infer
# ---------------------------------------------------------------------------------------------


def load_any_model(model_dir: str | Path, checkpoint: str | None = None,
                   attention: str | None = None, verbose: bool = True, **arc: Any) -> Any:
    """A statetx run / model directory / checkpoint, or an arc-state run directory (``arc``:
    more of :func:`statetx.arc.load_arc_run`'s options, ``rope``, ``trust_pickle``)."""
    from statetx.run import is_arc_run, load_run, model_from_arc
    from statetx.rundir import CHECKPOINT_DIR

    path = Path(model_dir)
    if not path.exists():
        raise UsageError(f"--model-dir {path}: not found.")
    if is_arc_run(path):
        if checkpoint is None and path.is_dir():
            ck = path / CHECKPOINT_DIR
            checkpoint = "final.ckpt" if (ck / "final.ckpt").exists() else (
                "last.ckpt" if (ck / "last.ckpt").exists() else None)
        return model_from_arc(path, checkpoint, attention=attention, verbose=verbose, **arc)
    return load_run(path, checkpoint, verbose=verbose)


def cmd_infer(a: argparse.Namespace) -> int:
    src = Path(a.adata)  # (argument errors before the slow imports)
    if not src.is_file():
        raise UsageError(f"--adata {src}: file not found.")
    if not Path(a.model_dir).exists():
        raise UsageError(f"--model-dir {a.model_dir}: not found.")
    if a.output and a.output_dir:
        raise UsageError("give --output or --output-dir, not both.")
    out = (Path(a.output) if a.output else
           Path(a.output_dir or src.parent) / f"{src.stem}_simulated.h5ad")
    if out.suffix not in (".h5ad", ".npy"):
        raise UsageError(f"--output {out}: use a .h5ad or .npy file name.")
    _not_the_input(out, src)
    from statetx._utils import check_folder

    check_folder(out.parent, "--output's folder")
    _check_writable(out)  # (before the model is loaded and the prediction made)
    if out.suffix == ".npy" and a.layout == "arc":
        raise UsageError("--layout arc places predictions inside a copy of the input: write an "
                         ".h5ad (--output x.h5ad), or drop --layout for a .npy.")
    import numpy as np

    from statetx._utils import did_you_mean, preview
    from statetx.predict import check_matmul_precision

    check_matmul_precision(a.matmul_precision)
    clip = _parse_clip(a.clip)
    with contextlib.ExitStack() as quiet:
        if a.quiet:
            quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(
                open(os.devnull, "w"))))
        arc = _arc_options(a)
        model = load_any_model(a.model_dir, a.checkpoint, attention=a.attention, **arc)
        given = [a.attention, a.rope, a.trust_pickle, a.n_heads, a.n_kv_heads, a.head_dim,
                 not a.strict]
        if not hasattr(model, "arc_import_") and any(v not in (None, False) for v in given):
            _say("--attention / --rope / --trust-pickle / --n-heads / --n-kv-heads / --head-dim "
                 "/ --no-strict read arc-state checkpoints: ignored for this statetx model.")
        c = model.columns_
        adata = _read(src)
        pert_col = a.pert_col or c.pert_col
        if pert_col not in adata.obs:
            raise DataError(f"perturbation column '{pert_col}' is not in {src} (obs columns: "
                            f"{', '.join(map(str, adata.obs.columns))}); pass --pert-col."
                            + _pert_col_hint(adata, pert_col, model))
        ct_col = _pick_column(adata, a.celltype_col, c.cell_type_key, CELLTYPE_COLS,
                              "cell-type", "--celltype-col")
        no_ct = (a.celltype_col or "").lower() == "none"  # all cells one context
        needs_batch = model._needs_batch("all" if no_ct else "cell_type" if a.basal == "self"
                                         else a.basal_pool)
        batch_col = (_pick_column(adata, a.batch_col, c.batch_col, BATCH_COLS, "batch",
                                  "--batch-col") if needs_batch else None)
        control = a.control_pert or c.control_pert
        if a.celltypes:
            wanted = [t.strip() for item in a.celltypes for t in item.split(",") if t.strip()]
            if ct_col is None:
                raise UsageError("--celltypes needs a cell-type column (--celltype-col).")
            labels = adata.obs[ct_col].astype(str)
            unknown = sorted(set(wanted) - set(labels))
            if unknown:
                raise DataError(f"--celltypes: {', '.join(unknown)} not found in obs['{ct_col}'] "
                                f"(it holds {preview(sorted(set(labels)), 12)})."
                                + did_you_mean(unknown[0], sorted(set(labels))))
            adata = adata[labels.isin(wanted).to_numpy()].copy()
        if a.embed_key == "X" and c.embed_key is not None:  # genes read from X by name
            if c.embed_key != "X_hvg":
                raise UsageError(f"--embed-key X: the model reads an embedding "
                                 f"(obsm['{c.embed_key}']), not genes; name the input's obsm "
                                 "key holding it.")
            if "X_hvg" in adata.obsm:
                del adata.obsm["X_hvg"]
                _say("--embed-key X: the model's genes are read from X by name (the input's "
                     "obsm['X_hvg'] is not used).")
        elif a.embed_key and a.embed_key != "X" and a.embed_key != c.embed_key:
            adata = _remap_embedding(adata, a.embed_key, c.embed_key, model.var_names_)
        for flag, value in (("--min-cells", a.min_cells), ("--max-cells", a.max_cells)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} {value}: give a number of cells >= 1.")
        if a.min_cells is not None and a.max_cells is not None and a.min_cells > a.max_cells:
            raise UsageError(f"--min-cells {a.min_cells} is above --max-cells {a.max_cells}.")
        if a.tsv is not None and not Path(a.tsv).is_file():
            raise UsageError(f"--tsv {a.tsv}: file not found.")
        seed = model._seed(a.seed)  # (default: the model's training seed)
        adata = _expand_cells(adata, pert_col, control, a.tsv, seed,
                              # (labels the model lacks: said as the TSV's, unless asked for)
                              vocab=model.vocab_ if a.unknown_perturbation == "error"
                              and a.pert_features is None else None)
        source = c.embed_key or "X"
        if source == "X_hvg" and "X_hvg" not in adata.obsm:  # the genes are matched in X
            source = "X_hvg (no obsm['X_hvg'] in the input: its genes are read from X by name)"
        _say(f"model {a.model_dir}: input {source}, {model.n_features_in_} features; "
             f"pert_col={pert_col!r}, cell type column={ct_col!r}, batch column={batch_col!r}"
             + ("" if needs_batch else " (not used: controls are not paired by batch)") + ", "
             f"control={control!r}; attention {model.network_config_.attention}; fp32, "
             f"matmul precision {a.matmul_precision}")
        pred = model.predict(
            adata, pert_col=pert_col,
            cell_type_col=False if no_ct else ct_col or c.cell_type_key,
            batch_col=batch_col, control_pert=control, seed=seed, set_len=a.max_set_len,
            windows=a.windows, basal_pool=a.basal_pool, basal_fallback=a.basal_fallback,
            basal=a.basal,
            unknown_perturbation=a.unknown_perturbation, unknown_batch=a.unknown_batch,
            untrained_perturbation=a.untrained_perturbation, pert_features=a.pert_features,
            predict_controls=not a.no_predict_controls, all_perts=a.all_perts,
            n_cells_per_pert=a.virtual_cells_per_pert, min_cells=a.min_cells,
            max_cells=a.max_cells, clip=clip,
            missing_genes=a.missing_genes, matmul_precision=a.matmul_precision,
            gene_name_col=(False if (a.gene_name_col or "").lower() == "none"
                           else a.gene_name_col),
            sets_per_pass=64 if a.batch_size is None else a.batch_size, layout=a.layout)
        if a.tsv is not None and a.layout != "arc":  # a virtual experiment keeps uns (§3.4)
            pred.uns = {**adata.uns, **pred.uns}
        if out.suffix == ".npy":
            x = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
            arr = np.ascontiguousarray(x, dtype=np.float32)
            _atomic(out, lambda tmp: np.save(tmp, arr))
        else:
            _write_h5ad(pred, out)
        copied = int((pred.obs["statetx_set"] < 0).sum()) if "statetx_set" in pred.obs else 0
        key = model.columns_.embed_key
        where = (f"in obsm['{key}']" if a.layout == "arc" and key and key in pred.obsm
                 else f"x {pred.n_vars}")
        _say(f"wrote {pred.n_obs - copied} predicted cells"
             + (f" and {copied} control cells copied as they are" if copied else "")
             + f" {where} to {out}")
    return EXIT_OK


def _parse_clip(text: str) -> Any:
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t == "none":
        return None
    try:
        lo, hi = (float(x) for x in t.split(","))
    except ValueError:
        raise UsageError(f"--clip {text}: use auto, none or LO,HI (e.g. 0,14).") from None
    return (lo, hi)


def _pert_col_hint(adata: Any, pert_col: str, model: Any) -> str:
    """Which obs columns to name for a missing perturbation column: those holding the model's
    perturbation labels (most of them first; arc-state's default name ``gene`` on a tie), else
    the names spelled like ``pert_col``."""
    import pandas as pd

    from statetx._utils import did_you_mean, preview

    vocab = getattr(model, "vocab_", None)
    labels = set(map(str, getattr(vocab, "perturbations", None) or ()))
    found: list[tuple[int, float, bool, str, list[str]]] = []
    for col in map(str, adata.obs.columns) if labels else ():
        values = adata.obs[col]
        if not (values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype)
                or pd.api.types.is_string_dtype(values.dtype)):
            continue  # (numbers and flags: not perturbation labels)
        have = set(map(str, pd.unique(values.dropna().astype(str))))
        shared = sorted(have & labels)
        if shared:
            found.append((len(shared), len(shared) / len(have), col == "gene", col, shared))
    if not found:
        return did_you_mean(pert_col, map(str, adata.obs.columns))
    found.sort(key=lambda f: f[:3], reverse=True)
    hits, _, _, best, shared = found[0]
    others = [f[3] for f in found[1:3]]
    return (f" obs['{best}'] holds {hits} of the model's {len(labels)} perturbation labels "
            f"({preview(shared, 3)}): --pert-col {best}"
            + (f" (fewer in {', '.join(map(repr, others))})." if others else "."))


def _pick_column(adata: Any, given: str | None, model_col: str | None, auto: Sequence[str],
                 what: str, flag: str) -> str | None:
    cols = list(map(str, adata.obs.columns))
    if given:
        if given.lower() == "none":
            return None
        if given not in cols:
            raise DataError(f"{flag} {given}: no such obs column (available: {', '.join(cols)}).")
        return given
    if model_col and model_col in cols:
        return model_col
    for c in auto:
        if c in cols:
            _say(f"{what} column '{model_col}' not in the input: using '{c}' (auto-detected).")
            return c
    return None


def _remap_embedding(adata: Any, key: str, model_key: str | None,
                     features: Sequence[str]) -> Any:
    """--embed-key: obsm[key] as the model's input. Genes (X, X_hvg) are matched by name, so a
    gene matrix needs its names (uns['<key>_var_names']), unless the model's ``features`` are
    positions (``X_hvg_0``, ...: an imported model without gene names)."""
    if key not in adata.obsm:
        raise DataError(f"--embed-key {key}: not in obsm (available: "
                        f"{', '.join(adata.obsm.keys()) or 'none'}).")
    adata = adata.copy()
    positional = list(features) == [f"{model_key}_{i}" for i in range(len(features))]
    if model_key in (None, "X_hvg") and not positional:
        import anndata as ad
        import pandas as pd

        names = adata.uns.get(f"{key}_var_names")
        if names is None or len(names) != adata.obsm[key].shape[1]:
            raise DataError(f"--embed-key {key}: this model reads genes ({model_key or 'X'}), "
                            f"matched by name, and obsm['{key}'] has no gene names "
                            f"(uns['{key}_var_names']). Add them, or leave --embed-key out.")
        names = list(map(str, names))
        if model_key is None:
            adata = ad.AnnData(X=adata.obsm[key], obs=adata.obs,
                               var=pd.DataFrame(index=pd.Index(names)))
        else:
            adata.obsm["X_hvg"], adata.uns["X_hvg_var_names"] = adata.obsm[key], names
    else:
        adata.obsm[model_key] = adata.obsm[key]
    _say(f"using obsm['{key}'] as the model input ({model_key or 'X'}).")
    return adata


def _expand_cells(adata: Any, pert_col: str, control: str, tsv: str | None, seed: int,
                  vocab: Any = None) -> Any:
    """Apply --tsv: that many virtual cells per listed perturbation, cloned from random control
    cells (of any context, as the reference). With the model's ``vocab``, a listed
    perturbation it does not know is an error naming the TSV."""
    if tsv is None:
        return adata
    import anndata as ad
    import numpy as np
    import pandas as pd

    from statetx._utils import did_you_mean, preview

    rng = np.random.default_rng([int(seed), 11])
    labels = adata.obs[pert_col].astype(str).to_numpy()
    rows: list[np.ndarray] = [np.arange(adata.n_obs)]
    new_labels: list[np.ndarray] = [labels]
    table = pd.read_csv(tsv, sep="\t")
    if not {"perturbation", "num_cells"} <= set(table.columns):
        raise DataError(f"--tsv {tsv}: needs columns 'perturbation' and 'num_cells' (tab "
                        f"separated); found {', '.join(map(str, table.columns))}.")
    counts = pd.to_numeric(table["num_cells"], errors="coerce")
    bad = table[~(counts.notna() & (counts >= 0) & (counts == counts.round()))]
    if len(bad):
        raise DataError(f"--tsv {tsv}: num_cells must be whole numbers >= 0; row(s) "
                        + ", ".join(f"{r.perturbation}: {r.num_cells!r}"
                                    for r in bad.head(5).itertuples()) + ".")
    listed = table["perturbation"].astype(str).to_numpy()
    if vocab is not None:
        unknown = list(dict.fromkeys(listed[vocab.encode("pert", listed, on_unknown="ignore")
                                            < 0]))
        if unknown:
            raise DataError(
                f"--tsv {tsv}: {len(unknown)} perturbation(s) are not in the model's "
                f"vocabulary: {preview(unknown)}.{did_you_mean(unknown[0], vocab.perturbations)}"
                " Correct them in the TSV (its 'perturbation' column names the perturbations "
                "to simulate), or pass --unknown-perturbation control / zeros to predict them "
                "anyway" + (", or --pert-features FILE with their vectors"
                            if vocab.pert_features is not None else "") + ".")
    ctrl = np.flatnonzero(labels == control)
    if not len(ctrl):
        raise DataError(f"--tsv needs control cells (obs['{pert_col}'] == '{control}').")
    for p, n in zip(table["perturbation"].astype(str), counts.astype(int)):
        rows.append(ctrl[rng.integers(len(ctrl), size=n)])
        new_labels.append(np.full(n, p, dtype=object))
    idx = np.concatenate(rows)
    out = adata[idx].copy()
    out.obs[pert_col] = pd.Categorical(np.concatenate(new_labels))
    names = np.asarray(adata.obs_names)[idx].astype(object)
    out.obs_names = ad.utils.make_index_unique(pd.Index(names.astype(str)))
    return out


# ---------------------------------------------------------------------------------------------
# preprocessing and the knock-down filter
# ---------------------------------------------------------------------------------------------


def _read(path: str | Path, backed: bool = False) -> Any:
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: file not found.")
    try:
        return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad input file
        raise DataError(f"could not read {p} as an AnnData (.h5ad) file: "
                        f"{type(exc).__name__}: {exc}") from None


def _check_output(output: str, source: str) -> None:
    """``--output`` of a command that writes an AnnData: a .h5ad file, not its input."""
    out = Path(output)
    if out.suffix != ".h5ad":
        raise UsageError(f"--output {out}: the result is an AnnData; use a .h5ad file name.")
    _not_the_input(out, source)
    _check_writable(out)


def _check_writable(output: str | Path, flag: str = "--output") -> None:
    """Refuse an output location where no file can be created (a read-only folder, /proc, a
    full disk ...) before the work: a temporary file is created and removed in its folder, or
    in the nearest existing folder above it (where the missing ones would be created)."""
    from statetx._utils import temporary_name

    out = Path(output)
    folder = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if folder is None or not folder.is_dir():  # (check_folder says what is wrong)
        return
    probe = temporary_name(folder / out.name, ".probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {output}: cannot write there ({exc.strerror or exc}"
                         + (f", in {folder}" if folder != out.parent else "") + ").") from None
    finally:
        probe.unlink(missing_ok=True)


def _not_the_input(output: str | Path, *sources: str | Path, flag: str = "--output") -> None:
    """Refuse an output file that is one of the command's input files."""
    from statetx._utils import same_file

    if any(same_file(output, s) for s in sources):
        raise UsageError(f"{flag} {output} is an input file: give another name (the input "
                         "is kept as it is).")


def cmd_preprocess_train(a: argparse.Namespace) -> int:
    from statetx.pp import preprocess_train

    _check_output(a.output, a.adata)
    adata = _read(a.adata)
    _say(f"preprocess_train {a.adata}: {adata.n_obs} cells x {adata.n_vars} genes, "
         f"{a.num_hvgs} HVGs, flavor {a.flavor}, "
         + ("X taken as already normalised" if a.already_normalized else
            f"target_sum {a.target_sum if a.target_sum else 'median'}"))
    include = [g.strip() for g in (a.include_genes or "").split(",") if g.strip()]
    preprocess_train(adata, a.num_hvgs, target_sum=a.target_sum, flavor=a.flavor,
                     layer=a.layer, already_normalized=a.already_normalized,
                     include_genes=include or None)
    _write_h5ad(adata, Path(a.output))
    _say(f"wrote {a.output} (X {'as given' if a.already_normalized else 'log1p-normalised'}, "
         f"obsm['X_hvg'] {adata.obsm['X_hvg'].shape[1]} HVGs)")
    return EXIT_OK


def cmd_combination_features(a: argparse.Namespace) -> int:
    from statetx.io import obs_labels
    from statetx.vocab import combination_features, save_pert_features

    if Path(a.output).suffix.lower() not in (".pt", ".pth", ".torch", ".safetensors", ".npz",
                                             ".csv"):
        raise UsageError(f"--output {a.output}: write the table as .pt, .safetensors, .npz or "
                         ".csv.")
    table, pert_col, control = None, a.pert_col, a.control_pert
    if a.model_dir is not None:  # (its columns are the defaults)
        model = load_any_model(a.model_dir, verbose=False)
        table = model.pert_feature_table_
        if table is None:
            raise UsageError(f"--model-dir {a.model_dir}: the model encodes perturbations "
                             "one-hot (no feature table to sum); train it with "
                             "data.kwargs.perturbation_features_file=... to predict new pairs.")
        pert_col = pert_col or model.columns_.pert_col
        control = control or model.vocab_.control_pert
    adata = _read(a.adata, backed=True)  # (obs only)
    try:
        labels = obs_labels(adata.obs, pert_col or "gene", a.adata, "--pert-col")
    finally:
        adata.file.close()
    _say(f"combination features of obs['{pert_col or 'gene'}'] in {a.adata}: parts split at "
         f"{a.sep!r}, control {control!r}"
         + (f", vectors of {a.model_dir}" if table is not None else ", multi-hot"))
    out = combination_features(labels, table, sep=a.sep, control_pert=control)
    _atomic(Path(a.output), lambda tmp: save_pert_features(out, tmp))
    width = len(next(iter(out.values())))
    _say(f"wrote {a.output}: {len(out)} labels x {width} "
         + ("(the model's vectors, summed over parts)" if table is not None else
            "(multi-hot over the singles)"))
    return EXIT_OK


def cmd_preprocess_infer(a: argparse.Namespace) -> int:
    from statetx.pp import make_control_template

    _check_output(a.output, a.adata)
    adata = _read(a.adata)
    cols = list(map(str, adata.obs.columns))
    ct = a.celltype_col
    if ct is None:
        ct = next((c for c in CELLTYPE_COLS if c in cols), None)
    elif ct.lower() == "none":
        ct = None
    batch = None
    if a.match_batch:
        batch = a.batch_col or next((c for c in BATCH_COLS if c in cols), None)
        if batch is None:
            raise UsageError("--match-batch: no batch column found; pass --batch-col.")
    _say(f"control template: pert_col={a.pert_col!r}, control={a.control_condition!r}, "
         f"cell types {ct!r}, batch {batch!r}, seed {a.seed}")
    make_control_template(adata, a.pert_col, a.control_condition, ct, seed=a.seed,
                          batch_col=batch, embed_key=a.embed_key)
    _write_h5ad(adata, Path(a.output))
    _say(f"wrote {a.output}")
    return EXIT_OK


def cmd_filter(a: argparse.Namespace) -> int:
    import pandas as pd

    from statetx.pp import filter_on_target_knockdown

    _check_output(a.output, a.input)
    adata = _read(a.input)
    _say(f"knock-down filter of {a.input}: pert_col={a.perturbation_column!r}, control="
         f"{a.control_label!r}, target expression below {a.residual_expression:g} (mean) and "
         f"{a.cell_residual_expression:g} (per cell) of the controls' mean, at least "
         f"{a.min_cells} cells left, expression from {a.layer or 'X'}")
    out, report = filter_on_target_knockdown(
        adata, a.perturbation_column, a.control_label, a.residual_expression,
        a.cell_residual_expression, a.min_cells, a.layer, a.var_gene_name or "auto",
        on_unmatched=a.on_unmatched, preprocess=a.preprocess, verbose=a.verbose,
        return_report=True)
    _say(f"kept {out.n_obs} of {adata.n_obs} cells")
    if a.report and Path(a.report).is_dir():  # (checked before anything is written)
        raise UsageError(f"--report {a.report} is a folder; give a CSV file name.")
    _write_h5ad(out, Path(a.output))
    _say(f"wrote {a.output}")
    if a.report:
        report_path = Path(a.report)
        stages_path = report_path.with_name(f"{report_path.stem}_stages.csv")
        stages = out.uns["statetx_knockdown_filter"]["stages"]
        _atomic(report_path, lambda tmp: report.to_csv(tmp, index=False))
        _atomic(stages_path, lambda tmp: pd.DataFrame(stages).to_csv(tmp, index=False))
        _say(f"wrote the per-perturbation report to {report_path} and the per-stage summary "
             f"to {stages_path}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def cmd_evaluate_run(a: argparse.Namespace) -> int:
    if a.cpm_filter is not None:
        raise ConfigError(f"--cpm-filter {a.cpm_filter:g} is not supported by statetx yet (no "
                          "CPM filter is applied); leave it out.")
    if a.ceiling_seed is not None and not a.ceiling:
        raise UsageError("--ceiling-seed needs --ceiling.")
    if a.ceiling_seed is not None and a.ceiling_seed < 0:
        raise UsageError(f"--ceiling-seed {a.ceiling_seed}: give a seed >= 0.")
    for f in (a.adata_pred, a.adata_real):
        if not Path(f).is_file():
            raise UsageError(f"{f}: file not found.")
    skip = [s.strip() for s in (a.skip_metrics or "").split(",") if s.strip()]
    a.pert_col, a.control_pert = _recorded_labels(a.adata_pred, a.pert_col, a.control_pert)
    _say(f"evaluate {a.adata_pred} against {a.adata_real}: pert_col={a.pert_col!r}, "
         f"control={a.control_pert!r}, "
         + (f"per cell type of obs['{a.celltype_col}']" if a.celltype_col else
            "cell types pooled") + f", profile {a.profile}")
    from statetx.metrics import evaluate

    _, agg = evaluate(a.adata_pred, a.adata_real, pert_col=a.pert_col,
                      control_pert=a.control_pert, celltype_col=a.celltype_col,
                      profile=a.profile, outdir=a.outdir, embed_key=a.embed_key,
                      skip_metrics=skip, de_pred=a.de_pred, de_real=a.de_real,
                      num_threads=a.num_threads, allow_discrete=a.allow_discrete,
                      counts_target=a.counts_target,
                      epsilon=a.epsilon, de_mode=a.de_mode, align_genes=a.align_genes,
                      shared_only=a.shared_only, batch_size=a.batch_size,
                      ceiling=a.ceiling, ceiling_seed=a.ceiling_seed or 0)
    _print_agg(agg)
    _say(f"results written to {a.outdir}")
    return EXIT_OK


def _recorded_labels(path: str, pert_col: str | None, control: str | None) -> tuple[str, str]:
    """The perturbation column and control label: as given, else those statetx recorded in the
    file (``uns["statetx"]``), else cell-eval's defaults."""
    if pert_col is not None and control is not None:
        return pert_col, control
    from statetx.metrics._inputs import recorded_labels

    backed = _read(path, backed=True)
    try:
        return recorded_labels(backed, pert_col, control)
    finally:
        backed.file.close()


def cmd_evaluate_baseline(a: argparse.Namespace) -> int:
    import pandas as pd

    from statetx.metrics import cell_mean_baseline, wilcoxon_de
    from statetx.metrics._inputs import recorded_labels

    _check_output(a.output, a.adata)
    if a.output_de:
        _not_the_input(a.output_de, a.adata, flag="--output-de")
        if Path(a.output_de).resolve() == Path(a.output).resolve():
            raise UsageError("--output-de and --output name one file; give two names.")
    adata = _read(a.adata)
    a.pert_col, a.control_pert = recorded_labels(adata, a.pert_col, a.control_pert)
    n_cells = None
    if a.counts:
        t = pd.read_csv(a.counts)
        label = a.pert_col if a.pert_col in t.columns else None
        if label is None and "n_cells" in t.columns and t.shape[1] == 2:
            label = next(c for c in t.columns if c != "n_cells")  # the other column
        if label is None or "n_cells" not in t.columns:
            raise DataError(f"{a.counts}: expected columns '{a.pert_col}' (or one other) and "
                            f"'n_cells', found {list(map(str, t.columns))}.")
        counts = pd.to_numeric(t["n_cells"], errors="coerce")
        if counts.isna().any() or (counts < 0).any() or (counts % 1 != 0).any():
            raise DataError(f"{a.counts}: column 'n_cells' must hold whole numbers >= 0.")
        n_cells = dict(zip(t[label].astype(str), counts.astype(int)))
    _say(f"cell-mean baseline of {a.adata}: pert_col={a.pert_col!r}, control="
         f"{a.control_pert!r}, cells per perturbation "
         + (f"from {a.counts}" if a.counts else "as in the input"))
    base = cell_mean_baseline(adata, a.pert_col, a.control_pert, n_cells=n_cells)
    _write_h5ad(base, Path(a.output))
    _say(f"wrote the cell-mean baseline ({base.n_obs} cells) to {a.output}")
    if a.output_de:
        de = wilcoxon_de(base.X, base.obs[a.pert_col].astype(str).to_numpy(), a.control_pert,
                         list(map(str, base.var_names)), num_threads=a.num_threads)
        _atomic(Path(a.output_de), lambda tmp: de.to_csv(tmp, index=False))
        _say(f"wrote the baseline DE table to {a.output_de}")
    return EXIT_OK


def cmd_evaluate_score(a: argparse.Namespace) -> int:
    from statetx.metrics import score_agg

    for f in (a.user_input, a.base_input):
        if not Path(f).is_file():
            raise UsageError(f"{f}: file not found.")
    _say(f"score {a.user_input} against the baseline {a.base_input}")
    score = score_agg(a.user_input, a.base_input)
    _atomic(Path(a.output), lambda tmp: score.to_csv(tmp, index=False))
    print(score.to_string(index=False))
    return EXIT_OK


def cmd_evaluate_prep(a: argparse.Namespace) -> int:
    from statetx.metrics.vcc import prep_output_path, prep_vcc

    for path in (a.input, a.genes):
        if not Path(path).is_file():
            raise UsageError(f"{path}: file not found.")
    from statetx.metrics._inputs import recorded_labels

    head = _read(a.input, backed=True)  # obs and var only: prep_vcc checks the options first
    try:
        shape = head.shape
        a.pert_col, a.ntc_name = recorded_labels(head, a.pert_col, a.ntc_name)
    finally:
        head.file.close()
    _say(f"prep {a.input}: pert_col={a.pert_col!r}, control={a.ntc_name!r}, gene list "
         f"{a.genes}, encoding {a.encoding}")
    out = prep_vcc(a.input, a.genes, a.output or prep_output_path(a.input),
                   pert_col=a.pert_col, control_pert=a.ntc_name, encoding=a.encoding,
                   expected_gene_dim=a.expected_gene_dim, max_cell_dim=a.max_cell_dim)
    _say(f"wrote {out} ({shape[0]} cells x {shape[1]} genes, "
         f"{out.stat().st_size / 1e6:.1f} MB)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# import-arc, info
# ---------------------------------------------------------------------------------------------


def cmd_import_arc(a: argparse.Namespace) -> int:
    arc = _arc_options(a)
    run = Path(a.run_dir)
    if not run.exists():
        raise UsageError(f"{run}: not found.")
    from statetx.rundir import looks_like_run

    is_run = looks_like_run(run if run.is_dir() else run.parent.parent)
    if is_run or (run.is_dir() and (run / "model.safetensors").is_file()):
        raise UsageError(f"{run} is a statetx {'run' if is_run else 'model'}, not an "
                         "arc-state run: nothing to import. Use it as it is (tx infer --model_dir, "
                         "tx predict --output_dir, StateTransitionModel.load_run / load).")
    out = Path(a.out)
    ours = {"model.json", "model.safetensors", "arc_import.json"}  # an earlier import: replaced
    names = set(p.name for p in out.iterdir()) if out.is_dir() else set()
    if out.exists() and (not out.is_dir() or names - ours
                         or (names and "arc_import.json" not in names)):
        raise UsageError(f"--out {out} exists and holds other files (a run or data?); choose a "
                         "new or empty folder.")
    ck = a.checkpoint
    if ck is None and run.is_dir():
        ck = "final.ckpt" if (run / "checkpoints" / "final.ckpt").exists() else "last.ckpt"
    from statetx.model import StateTransitionModel

    fill = {"control_pert": a.control_pert, "cell_set_len": a.cell_set_len}
    if a.embed_key is not None:
        fill["embed_key"] = None if a.embed_key.lower() == "none" else a.embed_key
    model = StateTransitionModel.from_arc_state(run, ck or "final.ckpt", attention=a.attention,
                                                **arc, **fill)
    model.save(a.out)
    prov = getattr(model, "arc_import_", None)
    if prov:
        import json

        from statetx._utils import atomic_write_text

        atomic_write_text(Path(a.out) / "arc_import.json",
                          json.dumps(prov, indent=1, default=str))
    _say(f"saved the imported model to {a.out} (load with StateTransitionModel.load or use it "
         "as tx infer --model-dir)")
    return EXIT_OK


def cmd_info(a: argparse.Namespace) -> int:
    from statetx.run import is_arc_run, load_run
    from statetx.rundir import CONFIG_FILE, read_run_info

    path = Path(a.path)
    if not path.exists():
        raise UsageError(f"{path}: not found.")
    if path.is_dir() and path.name == "checkpoints" and not is_arc_run(path.parent):
        path = path.parent  # a run's checkpoints folder: describe the run
    if path.is_file() and path.suffix.lower() not in (".ckpt", ".pt", ".pth"):
        raise UsageError(f"{path} is not a run, model or checkpoint: info describes a run "
                         "folder, a model folder (model.json) or a checkpoint file (.ckpt).")
    attention = None
    if is_arc_run(path):
        from statetx.arc import AmbiguousAttentionError

        try:
            model = load_any_model(path, None, verbose=False)
        except AmbiguousAttentionError:  # described all the same, the mode said to be unknown
            model = load_any_model(path, None, attention="bidirectional", verbose=False)
            attention = ("not recorded by the checkpoint (bidirectional or causal: pass "
                         "--attention to tx infer or import-arc, or compare both with "
                         "statetx.probe_attention)")
        kind = "arc-state run (imported)"
    else:
        model = load_run(path, verbose=False)
        kind = "statetx run" if (path / CONFIG_FILE).exists() else (
            "statetx checkpoint" if path.is_file() else "statetx model directory")
    if path.is_dir() and (path / "arc_import.json").is_file():
        import json

        model.arc_import_ = json.loads((path / "arc_import.json").read_text())
        kind = "statetx model directory (imported from arc-state)"
    _describe_model(model, kind, attention)
    if path.is_dir():
        info = read_run_info(path)
        if info.get("final_step") is not None:
            print(f"final step: {info['final_step']} (best step {info.get('best_step')}); "
                  f"training time {info.get('train_seconds', 0):.1f} s")
        ck = path / "checkpoints"
        if ck.is_dir():
            print("checkpoints: " + ", ".join(sorted(p.name for p in ck.glob("*.ckpt"))))
    return EXIT_OK


def _describe_model(model: Any, kind: str, attention: str | None = None) -> None:
    from statetx.presets import describe

    c, v, cols = model.network_config_, model.vocab_, model.columns_
    resolved = getattr(model, "preset_", None) or model.preset
    print(f"{kind}: preset {resolved}"
          + (f" (chosen by preset={model.preset!r})" if resolved != model.preset else ""))
    settings = getattr(model, "train_settings_", None)
    if settings:
        print("training: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    print(describe(c).replace(f"attention {c.attention}", "attention ?") if attention else
          describe(c))
    print(f"attention {attention or c.attention}, positions "
          f"{'none' if c.rope is None else f'rotary theta={c.rope:g}'}; output space "
          f"{c.output_space}, output activation {c.output_activation}; cell_set_len "
          f"{model.cell_set_len_}")
    print(f"columns: pert_col={cols.pert_col!r}, cell_type_key={cols.cell_type_key!r}, "
          f"batch_col={cols.batch_col!r}, control={cols.control_pert!r}, input "
          f"{cols.embed_key or 'X'}")
    n_out = len(model.gene_names_) if model.gene_names_ else (
        len(model.var_names_) if model._expression_output else None)
    print(f"vocabulary: {_vocab_counts(v)}; {len(model.var_names_)} input features"
          + (f", {len(model.gene_names_)} genes decoded" if model.gene_names_ else "")
          + (f"; {n_out} output genes" if n_out else "; output: an embedding"))
    arc = getattr(model, "arc_import_", None)
    step = getattr(model, "step_", None)
    if step is None and arc:
        step = arc.get("provenance", {}).get("global_step")
    if step is not None:
        print(f"training step: {step}")
    for ft in getattr(model, "finetuned_", None) or ():
        print(f"fine-tuned on controls: {ft['steps']} steps on the {ft['split']!r} split "
              f"(lr {ft['lr']:g}, seed {ft['seed']})")
    if arc:
        prov = arc.get("provenance", {})
        print(f"licence: {prov.get('license_notice') or prov.get('license') or 'see the run'}")
    else:
        print("licence: trained with statetx (MIT code); the weights follow the licence of the "
              "training data.")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


# Baselines compared with ST in `statetx demo`: names of statetx.baselines.BASELINES, with their
# options. Adding a baseline is one entry here.
DEMO_BASELINES: dict[str, dict] = {
    "perturb_mean": {},
    "context_mean": {},
    "cell_mean": {},
    "linear": {"n_components": 2},
    "control_mean": {},
}


def _demo_baselines(adata: Any, spec: Any, dataset: str, cols: dict) -> dict[str, tuple]:
    """{name: (adata_pred, adata_real)} of the test split for every demo baseline."""
    from statetx.baselines import fit_all_baselines

    out: dict[str, tuple] = {}
    for name, opts in DEMO_BASELINES.items():
        try:
            fitted = fit_all_baselines(adata, spec, dataset_name=dataset,
                                       baselines={name: opts}, **cols)
            out[name] = fitted[name].predict_split("test")
        except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the demo
            _say(f"baseline {name} skipped: {exc}")
    return out


def cmd_demo(a: argparse.Namespace) -> int:
    import pandas as pd

    from statetx.config import SplitConfig
    from statetx.datasets import example_toml, load_zhao2021
    from statetx.metrics import evaluate
    from statetx.model import StateTransitionModel
    from statetx.pp import preprocess_train

    if a.steps < 1:
        raise UsageError("--steps must be at least 1.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = load_zhao2021()
    preprocess_train(adata, n_top_genes=min(2000, adata.n_vars))
    split = SplitConfig.from_toml(example_toml("zhao2021"))
    dataset = split.referenced_datasets()[0]
    spec = split.model_copy(update={"datasets": {}})  # the data: the AnnData loaded above
    held = {k.split(".", 1)[1]: v for k, v in split.zeroshot.items()}
    test_ct = next(k for k, v in held.items() if v == "test")
    pert_col, control, ct_col = "target_gene", "DMSO", "cell_type"
    _say(f"demo: Zhao 2021 glioblastoma slices, {adata.n_obs} cells x {adata.n_vars} genes "
         f"(log1p); held out: {', '.join(f'{k} ({v})' for k, v in held.items())}; "
         f"{a.steps} training steps; output {out}")
    # the estimator's defaults (preset "auto" → small, batch pairing); only the length is set
    model = StateTransitionModel(
        pert_col=pert_col, cell_type_key=ct_col, batch_col="batch", control_pert=control,
        max_steps=a.steps, val_freq=max(a.steps // 3, 1), ckpt_every_n_steps=max(a.steps, 1),
        seed=a.seed, device=a.device, progress=True)
    model.fit(adata, spec, dataset_name=dataset, output_dir=out / "run")
    pred, real = model.predict_split("test", controls="real")  # same controls as the baselines
    pairs: dict[str, tuple] = {"ST (statetx)": (pred, real)}
    pairs.update(_demo_baselines(adata, spec, dataset, dict(
        pert_col=pert_col, cell_type_key=ct_col, control_pert=control, seed=a.seed)))
    rows = {}
    for name, (p, r) in pairs.items():
        res, _ = evaluate(p, r, pert_col=pert_col, control_pert=control, profile="minimal",
                          outdir=out / f"eval_{name.split()[0].lower()}")
        rows[name] = res.select_dtypes("number").mean(axis=0)
    table = pd.DataFrame(rows).T
    table.index.name = "model"
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(f"\nheld-out patient {test_ct}: {real.n_obs} cells; metrics (per perturbation, "
              "mean over perturbations):")
        print(table.to_string())
    _atomic(out / "demo_results.csv", lambda tmp: table.to_csv(tmp))
    _demo_plot(table, out / "demo_metrics.png", test_ct)
    _say(f"table {out / 'demo_results.csv'}, plot {out / 'demo_metrics.png'}; "
         f"{time.perf_counter() - t0:.0f} s in total")
    return EXIT_OK


def _demo_plot(table: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from statetx.metrics.vcc import BEST_ZERO as lower

    wanted = ["pearson_delta", "mse", "mae", "overlap_at_N", "precision_at_N"]
    cols = [c for c in wanted if c in table.columns] or list(table.columns)
    ncol = min(3, len(cols))
    nrow = -(-len(cols) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.0 * nrow), squeeze=False)
    colors = ["#1f77b4"] + ["#bbbbbb"] * (len(table) - 1)
    for ax, col in zip(axes.flat, cols):
        heights = table[col].to_numpy(float)
        ax.bar(range(len(table)), heights, color=colors)
        for p in np.flatnonzero(np.isnan(heights)):  # (undefined, e.g. a constant prediction)
            ax.text(p, 0.03, "n/a", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize="small")
        ax.set_xlim(-0.6, len(table) - 0.4)
        ax.set_xticks(range(len(table)))
        ax.set_xticklabels(table.index, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{col} ({'lower' if col in lower else 'higher'} is better)", fontsize=9)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.suptitle(f"held-out patient {title}: ST vs references")
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# atomic outputs
# ---------------------------------------------------------------------------------------------


def _atomic(path: Path, writer: Any) -> Path:
    from statetx._utils import atomic_write

    if Path(path).is_dir():
        raise UsageError(f"{path} is a folder; give a file name to write.")
    return atomic_write(path, writer, suffix=Path(path).suffix)


def _write_h5ad(adata: Any, path: Path) -> Path:
    """Write an AnnData atomically (temporary file in the same folder, then rename)."""
    from statetx.io import write_h5ad

    return _atomic(Path(path), lambda tmp: write_h5ad(adata, tmp))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
