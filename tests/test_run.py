"""Run configuration (override parsing, key schema, resolution) and run-directory helpers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statetx import runconfig as R
from statetx._utils import atomic_write_text
from statetx.errors import ConfigError, DataError
from statetx.rundir import absolute_split, resolve_checkpoint, start_run

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ value parsing
@pytest.mark.parametrize("text,expected", [
    ("true", True), ("False", False), ("TRUE", True), ("null", None), ("None", None),
    ("12", 12), ("-3", -3), ("1e-4", 1e-4), ("5e-5", 5e-5), ("1.5", 1.5), (".5", 0.5),
    ("1E3", 1000.0), ("[a,b,c]", ["a", "b", "c"]), ("[replogle_baseline]", ["replogle_baseline"]),
    ("[1, 2.5, true]", [1, 2.5, True]), ("[]", []), ("[[1,2],[3]]", [[1, 2], [3]]),
    ('"gene"', "gene"), ("'true'", "true"), ('"1e-4"', "1e-4"), ("non-targeting", "non-targeting"),
    ("path/to/config.toml", "path/to/config.toml"), ("", ""),
])
def test_parse_value(text, expected):
    got = R.parse_value(text)
    assert got == expected and type(got) is type(expected)


def test_parse_token_forms():
    assert R.parse_token("training.lr=1e-4") == ("training.lr", "1e-4")
    assert R.parse_token("+wandb.tags=[a]") == ("wandb.tags", "[a]")
    assert R.parse_token("name=a=b") == ("name", "a=b")
    with pytest.raises(ConfigError, match="deleting keys"):
        R.parse_token("~training.lr")
    with pytest.raises(ConfigError, match=r"'training.lr' has no value: write training.lr="):
        R.parse_token("training.lr")
    with pytest.raises(ConfigError, match="not a key=value.*Did you mean: training.lr"):
        R.parse_token("training.lrr")


# ------------------------------------------------------------------------------ resolution
def test_types_and_coercion():
    res = R.resolve(["training.lr=1e-4", "training.max_steps=4e4", "name=1",
                     "training.precision=32", "model.kwargs.batch_encoder=True",
                     "wandb.tags=[replogle_baseline]", "model.kwargs.decoder_hidden_dims=[64,32]",
                     "data.kwargs.control_pert='non-targeting'", "+training.val_freq=10",
                     "model.kwargs.backbone=GPT2"])
    v = res.values
    assert v["training.lr"] == 1e-4 and isinstance(v["training.lr"], float)
    assert v["training.max_steps"] == 40000 and isinstance(v["training.max_steps"], int)
    assert v["name"] == "1" and v["training.precision"] == "32"
    assert v["model.kwargs.batch_encoder"] is True
    assert v["wandb.tags"] == ["replogle_baseline"]
    assert v["model.kwargs.decoder_hidden_dims"] == [64, 32]
    assert v["data.kwargs.control_pert"] == "non-targeting"
    assert v["training.val_freq"] == 10 and v["model.kwargs.backbone"] == "gpt2"
    assert "training.lr" in res.given and "training.batch_size" not in res.given


@pytest.mark.parametrize("token,match", [
    ("training.max_steps=abc", "not an integer"),
    ("training.max_steps=1.5", "not an integer"),
    ("training.max_steps=true", "not an integer"),
    ("training.lr=1e-4x", "not a number"),
    ("overwrite=yes", "not a boolean"),
    ("data.kwargs.output_space=genes", "Did you mean: gene"),
    ("training.batch_size=null", "null is not allowed"),
    ("model.kwargs.decoder_hidden_dims=[a]", "list of integers"),
    ("data.kwargs.pert_col=[a,b]", "not a list"),
])
def test_type_errors_explain(token, match):
    with pytest.raises(ConfigError, match=match) as err:
        R.resolve([token])
    assert token.split("=")[0] in str(err.value)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"Did you mean: training\.max_steps") as err:
        R.resolve(["training.max_step=5"])
    assert "--list-keys" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.kwargs\.hidden_dim"):
        R.resolve(["model.kwargs.hiden_dim=3"])
    with pytest.raises(ConfigError, match="Known sections"):
        R.resolve(["trainer.max_steps=3"])
    # an entry of a dict key that has no effect (arc-state's training.mfu_kwargs.*): warned
    with pytest.warns(UserWarning, match="training.mfu_kwargs has no effect"):
        R.resolve(["training.mfu_kwargs.available_flops=1e15"])
    with pytest.raises(ConfigError, match="unknown configuration key 'training.max_steps.x'"):
        R.resolve(["training.max_steps.x=3"])  # (not for keys that have an effect)


def test_an_empty_value_unsets_an_optional_key():
    """data.kwargs.batch_col= (Hydra's empty value) means no batch column, as null does; the
    estimator refuses batch_col='' from Python, so the command line must not pass it on."""
    for given in ("data.kwargs.batch_col=", "data.kwargs.batch_col=''",
                  "data.kwargs.batch_col=null"):
        assert R.resolve([given]).values["data.kwargs.batch_col"] is None, given
    assert R.resolve(["data.kwargs.control_pert= "]).values["data.kwargs.control_pert"] is None
    with pytest.raises(ConfigError, match="training.max_steps"):
        R.resolve(["training.max_steps="])  # (not optional: still an error)


def test_wandb_keys_warn_once_that_they_have_no_effect(capsys):
    """W&B logging never happens (use_wandb=true is an error): its keys are accepted with one
    warning for all of them, and --list-keys tags them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = R.resolve(["wandb.tags=[a]", "wandb.project=p", "model=tiny"])
    said = [str(w.message) for w in caught if "wandb" in str(w.message)]
    assert len(said) == 1, said
    assert ("wandb.tags=[a], wandb.project=p" in said[0] or
            "wandb.project=p, wandb.tags=[a]" in said[0])
    assert "keys have no effect in statetx" in said[0] and "metrics.csv" in said[0]
    assert res.values["wandb.tags"] == ["a"]  # (kept in config.yaml, as arc-state's)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.resolve(["model=tiny"])  # (nothing said when no wandb key is given)
    from statetx.cli import main

    assert main(["tx", "train", "--list-keys"]) == 0
    keys = {line.split(" ", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    for k in ("wandb.project", "wandb.entity", "wandb.tags", "wandb.group", "wandb.notes",
              "wandb.dir"):
        assert keys[k].endswith("[accepted, no effect]"), keys[k]


def test_no_effect_keys_warn_and_unsupported_values_fail():
    with pytest.warns(UserWarning, match="num_workers has no effect"):
        R.resolve(["data.kwargs.num_workers=4"])
    with pytest.warns(UserWarning, match="softplus has no effect"):
        R.resolve(["model.kwargs.softplus=true"])
    R.resolve(["data.kwargs.exp_counts=false"])  # the default is accepted
    with pytest.raises(ConfigError, match="exp_counts is not supported"):
        R.resolve(["data.kwargs.exp_counts=true"])
    with pytest.raises(ConfigError, match="enabling model.kwargs.lora.enable"):
        R.resolve(["model.kwargs.lora.enable=true"])
    with pytest.raises(ConfigError, match="do not start processes.*torchrun --nproc_per_node"):
        R.resolve(["training.devices=4", 'training.strategy="ddp"'])
    with pytest.raises(ConfigError, match="pert_rep"):
        R.resolve(["data.kwargs.pert_rep=esm"])
    with pytest.raises(ConfigError, match="not a known preset"):
        R.resolve(["model=stat"])
    with pytest.raises(ConfigError, match="model=auto is the Python estimator's default.*"
                       "model=small.*model=state_sm"):
        R.resolve(["model=auto"])
    R.resolve(["model=state@0.11.1"])


def test_weight_decay_notice_and_seed_alias():
    res = R.resolve(["training.weight_decay=5e-4", "data.kwargs.random_seed=7"])
    assert any("never applied" in n for n in res.notices)
    assert res.values["training.train_seed"] == 7


def test_reference_config_weight_decay_is_kept_at_zero():
    """An arc-state config.yaml says weight_decay 5e-4, which arc-state never applied."""
    res = R.resolve([], base={"training": {"weight_decay": 5e-4, "lr": 1e-4}})
    assert res.values["training.weight_decay"] == 0.0
    assert any("never applied: kept at 0" in n for n in res.notices)
    given = R.resolve(["training.weight_decay=5e-4"],
                      base={"training": {"weight_decay": 5e-4}})  # typed: applied
    assert given.values["training.weight_decay"] == 5e-4
    own = R.resolve([], base={"training": {"weight_decay": 5e-4, "matmul_precision": "medium"}})
    assert own.values["training.weight_decay"] == 5e-4  # a statetx run's config: applied


def test_config_reads_an_arc_state_config_file(tmp_path):
    from conftest import FIXTURES, need

    path = need(FIXTURES / "arc_state" / "runs" / "model_a_llama_bidir" / "config.yaml")
    with pytest.warns(UserWarning, match="no effect"):
        res = R.resolve([], path)
    assert res.values["training.weight_decay"] == 0.0
    assert res.values["model.kwargs.hidden_dim"] == 32 and res.values["training.lr"] == 0.01
    assert any("never applied: kept at 0" in n for n in res.notices)


def test_aliases_and_contradictions():
    res = R.resolve(["model.kwargs.transformer_backbone_kwargs.num_attention_heads=2",
                     "model.kwargs.confidence_head=false", "training.wandb_track=false"])
    assert res.values["model.kwargs.n_heads"] == 2
    assert "model.kwargs.n_heads" in res.given
    with pytest.raises(ConfigError, match="contradicts"):
        R.resolve(["model.kwargs.hidden_dim=32",
                   "model.kwargs.transformer_backbone_kwargs.hidden_size=64"])
    # one key given twice: the later value, said (it won silently)
    twice = R.resolve(["data.kwargs.pert_col=target_gene", "data.kwargs.pert_col=gene"])
    assert twice.values["data.kwargs.pert_col"] == "gene"
    assert "data.kwargs.pert_col is given twice: gene replaces 'target_gene'." in twice.notices
    assert not R.resolve(["training.lr=0.01", "training.lr=1e-2"]).notices


def test_schema_matches_presets():
    from statetx.presets import ALIASES, ARCH_KEYS, list_presets

    assert R.ARCH_KEYS == ARCH_KEYS
    assert sorted(R.PRESET_NAMES) == sorted(p for p in list_presets() if "@" not in p)
    for alias in ALIASES:  # every reference spelling the presets accept is a config key too
        R.canonical(f"model.kwargs.{alias}")


# ------------------------------------------------------------------------------ planning
def _toml(tmp_path: Path) -> Path:
    from conftest import make_synthetic

    make_synthetic(n_cell_types=2, n_perts=2, n_cells=8, n_genes=8, n_controls=8).write_h5ad(
        tmp_path / "d.h5ad")
    p = tmp_path / "split.toml"
    p.write_text('[datasets]\nd = "d.h5ad"\n[training]\nd = "train"\n[zeroshot]\n'
                 '"d.CT1" = "test"\n')
    return p


def test_plan_preset_first_regardless_of_order(tmp_path):
    toml = f"data.kwargs.toml_config_path={_toml(tmp_path)}"
    a = R.plan_training(R.resolve([toml, "model.kwargs.n_layers=2", "model=tiny"]))
    b = R.plan_training(R.resolve(["model=tiny", toml, "model.kwargs.n_layers=2"]))
    assert a.params == b.params and a.config == b.config
    assert a.params["preset"] == "tiny" and a.params["model_kwargs"] == {"n_layers": 2}
    assert a.config["model"]["kwargs"]["n_layers"] == 2
    assert a.config["model"]["kwargs"]["hidden_dim"] == 128  # from the preset
    assert a.run_dir == Path("./debugging") / "debug"


def test_plan_loss_options_reach_the_estimator(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[datasets]\nd = "x.h5ad"\n[training]\nd = "train"\n')
    given = [f"data.kwargs.toml_config_path={toml}", "model=tiny", "model.kwargs.loss=se",
             "model.kwargs.blur=0.1", "model.kwargs.sinkhorn_weight=0.5",
             "model.kwargs.mmd_num_chunks=2", "model.kwargs.decoder_loss_weight=0.3",
             "model.kwargs.detach_decoder=true", "model.kwargs.regularization=0.01"]
    plan = R.plan_training(R.resolve(given), check_data=False)
    assert plan.params["loss"] == "se"
    assert plan.params["loss_kwargs"] == {"blur": 0.1, "sinkhorn_weight": 0.5,
                                          "mmd_num_chunks": 2, "decoder_weight": 0.3,
                                          "detach_decoder": True, "regularization": 0.01}
    # and back: the run configuration of the same estimator parameters
    cfg = R.config_from_params(plan.params)["model"]["kwargs"]
    assert (cfg["blur"], cfg["decoder_weight"], cfg["mmd_num_chunks"]) == (0.1, 0.3, 2)
    plain = R.plan_training(R.resolve(given[:2]), check_data=False)
    assert plain.params["loss_kwargs"] is None
    data_keys = R.plan_training(R.resolve([*given[:2], "data.kwargs.drop_missing_labels=true",
                                           "data.kwargs.val_subsample_fraction=0.5",
                                           "data.kwargs.on_missing_perturbation=warn"]),
                                check_data=False).params
    assert (data_keys["drop_missing_labels"], data_keys["val_subsample_fraction"],
            data_keys["on_missing_perturbation"]) == (True, 0.5, "warn")
    skip = R.plan_training(R.resolve([*given[:2], "model.kwargs.train_pert_skip=false"]),
                           check_data=False).params
    assert skip["train_pert_skip"] is False
    assert R.config_from_params(skip)["model"]["kwargs"]["train_pert_skip"] is False


def test_plan_batch_col_default_and_required_toml(tmp_path):
    toml = _toml(tmp_path)
    plan = R.plan_training(R.resolve([f"data.kwargs.toml_config_path={toml}", "model=tiny"]))
    assert plan.params["batch_col"] is None  # default gem_group absent -> one batch
    assert any("gem_group" in n for n in plan.notices)
    plan = R.plan_training(R.resolve([f"data.kwargs.toml_config_path={toml}",
                                      "data.kwargs.batch_col=batch"]))
    assert plan.params["batch_col"] == "batch"
    with pytest.raises(ConfigError, match="toml_config_path is required"):
        R.plan_training(R.resolve(["model=tiny"]))
    with pytest.raises(ConfigError, match="file not found"):
        R.plan_training(R.resolve([f"data.kwargs.toml_config_path={tmp_path / 'no.toml'}"]))


def test_plan_backbone_kwargs(tmp_path):
    toml = f"data.kwargs.toml_config_path={_toml(tmp_path)}"
    plan = R.plan_training(R.resolve([
        toml, "model=tiny",
        "model.kwargs.transformer_backbone_kwargs.bidirectional_attention=false"]))
    k = plan.config["model"]["kwargs"]
    assert k["attention"] == "causal" and k["rope"] == 10000.0
    with pytest.raises(ConfigError, match="max_position_embeddings=99 differs"):
        R.plan_training(R.resolve([
            toml, "model=tiny",
            "model.kwargs.transformer_backbone_kwargs.max_position_embeddings=99"]))
    ok = R.plan_training(R.resolve([
        toml, "model=tiny", "model.kwargs.cell_set_len=16",
        "model.kwargs.transformer_backbone_kwargs.max_position_embeddings=16"]))
    assert ok.config["model"]["kwargs"]["cell_set_len"] == 16


def test_config_dump_read_roundtrip(tmp_path):
    res = R.resolve(["training.lr=1e-4", "wandb.tags=[a,b]", "model=tiny"])
    cfg = res.nested()
    path = atomic_write_text(tmp_path / "config.yaml", R.dump_config(cfg))
    back = R.read_config(path)
    assert back == cfg
    again = R.resolve([], config_file=path)
    assert again.values == res.values
    assert R.config_differences(cfg, again.nested()) == []
    changed = R.resolve(["training.lr=1e-3", "training.max_steps=5", "model=tiny"]).nested()
    diffs = R.config_differences(cfg, changed)
    assert diffs == ["training.lr: 0.0001 -> 0.001"]  # max_steps may change on resume


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz.*c.yaml"):
        R.resolve([], config_file=p)
    p.write_text("training:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert R.resolve([], config_file=p).values["training.lr"] == 1e-4


# ------------------------------------------------------------------------------ run files
def test_resolve_checkpoint(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    with pytest.raises(DataError, match="no checkpoints"):
        resolve_checkpoint(tmp_path)
    (ck / "last.ckpt").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "last.ckpt"
    (ck / "final.ckpt").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "final.ckpt"
    assert "using checkpoint" in capsys.readouterr().out
    assert resolve_checkpoint(tmp_path, "last").name == "last.ckpt"
    with pytest.raises(DataError, match=r"available: final.ckpt, last.ckpt"):
        resolve_checkpoint(tmp_path, "best.ckpt")


def test_absolute_split(tmp_path):
    toml = _toml(tmp_path)
    cfg = absolute_split(toml)
    assert cfg.datasets["d"] == str(tmp_path.resolve() / "d.h5ad")
    assert absolute_split(None) is None


def test_start_run_refuses_to_delete_foreign_directory(tmp_path):
    toml = _toml(tmp_path)
    other = tmp_path / "out" / "r"
    other.mkdir(parents=True)
    (other / "precious.txt").write_text("x")
    plan = R.plan_training(R.resolve([f"data.kwargs.toml_config_path={toml}", "model=tiny",
                                      f"output_dir={tmp_path / 'out'}", "name=r",
                                      "overwrite=true"]))
    with pytest.raises(ConfigError, match="does not look like a statetx run"):
        start_run(plan)
    assert (other / "precious.txt").exists()


def test_cli_help_does_not_import_heavy_packages():
    code = textwrap.dedent("""
        import sys, io, contextlib
        import statetx.cli
        with contextlib.redirect_stdout(io.StringIO()):
            assert statetx.cli.main(["--help"]) == 0
            assert statetx.cli.main(["tx", "train", "--help"]) == 0
            assert statetx.cli.main(["tx", "infer", "--help"]) == 0
            assert statetx.cli.main(["evaluate", "run", "--help"]) == 0
        heavy = [m for m in ("torch", "anndata", "scanpy", "numpy", "pandas") if m in sys.modules]
        assert not heavy, heavy
        # a mistyped configuration key is said before the data and model code is imported
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert statetx.cli.main(["tx", "train", "data.kwarg.pert_col=x"]) == 2
        assert "Did you mean: data.kwargs.pert_col" in err.getvalue()
        heavy = [m for m in ("torch", "anndata", "scanpy") if m in sys.modules]
        assert not heavy, heavy
        import statetx.run, statetx.rundir  # (what tx train imports before training)
        heavy = [m for m in ("torch", "anndata", "scanpy", "pandas") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_train_split_file_errors_do_not_import_torch(tmp_path):
    """A missing or absent split file is said before the presets (torch, ~5 s) are imported."""
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        import statetx.cli
        for args in (["training.max_steps=10"],
                     ["data.kwargs.toml_config_path={tmp_path / 'nothere.toml'}"],
                     ["model=pertsets", "model.kwargs.init_from={tmp_path / 'no.ckpt'}",
                      "data.kwargs.toml_config_path={__file__}"]):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                assert statetx.cli.main(["tx", "train", *args]) == 2
            assert ("toml_config_path" in err.getvalue() or "init_from" in err.getvalue()), \
                err.getvalue()
            heavy = [m for m in ("torch", "scipy", "pandas", "anndata") if m in sys.modules]
            assert not heavy, (args, heavy)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_train_architecture_errors_do_not_import_torch():
    """model.kwargs errors come from statetx.netconfig (no torch): said in well under a second."""
    toml = REPO / "statetx" / "datasets" / "data" / "zhao2021.toml"
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        import statetx.cli
        base = ["data.kwargs.toml_config_path={toml}", "data.kwargs.pert_col=target_gene"]
        for args, said in ((["model.kwargs.hidden_dim=-3"], "hidden_dim must be an integer"),
                           (["model.kwargs.activation=tanh"], "activation"),
                           (["model=pertsets", "model.kwargs.transformer_backbone_kwargs.n_head=5"],
                            "does not divide hidden_dim")):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                assert statetx.cli.main(["tx", "train", *base, *args]) == 2
            assert said in err.getvalue(), err.getvalue()
            assert "torch" not in sys.modules, args
        from statetx.nn import NetworkConfig
        from statetx.netconfig import NetworkConfig as plain
        assert NetworkConfig is plain
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_namespaces_import_torch_only_when_a_name_needs_it():
    code = textwrap.dedent("""
        import sys
        import statetx, statetx.tl, statetx.metrics, statetx.pl, statetx.pp
        heavy = [m for m in ("torch", "sklearn", "scipy.stats") if m in sys.modules]
        assert not heavy, heavy
        assert set(statetx.tl.__all__) <= set(dir(statetx.tl)) and "__doc__" in dir(statetx.tl)
        from statetx.tl import evaluate, LinearBaseline
        assert evaluate is statetx.metrics.evaluate is statetx.evaluate and callable(evaluate)
        assert LinearBaseline is statetx.baselines.LinearBaseline and "torch" in sys.modules
        try:
            statetx.tl.nope
        except AttributeError as e:
            assert "statetx.tl" in str(e) and "nope" in str(e)
        else:
            raise AssertionError("no error")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


def test_cli_architecture_keys_match_the_presets():
    """run.py types every architecture key; a key added to the presets must be added there too."""
    from statetx.presets import ARCH_KEYS
    from statetx.runconfig import ARCH_TYPES

    assert set(ARCH_TYPES) == set(ARCH_KEYS)
