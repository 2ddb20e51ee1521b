"""The documentation and the quickstart notebook stay correct.

* the mkdocs site builds with ``--strict`` (broken links, missing pages, API objects that no
  longer exist, CLI/keys pages that fail to generate all fail the build);
* every TOML example in the docs is a valid split spec (unless marked ``<!-- invalid -->``, in
  which case it must be rejected);
* every ``statetx ...`` command in a bash block parses with the real CLI parser, and the
  ``tx train`` overrides resolve (known keys, valid values, known preset);
* the ST-vs-baselines snippet of the evaluation page runs (with a handful of steps);
* ``notebooks/quickstart.ipynb`` executes from top to bottom with its default parameters and is
  committed without outputs.

Tests skip with a clear reason when the optional tools (``pip install -e ".[docs]"``) are absent.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
SNIPPET = DOCS / "snippets" / "compare_baselines.py"

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
                    re.M | re.S)


def _blocks(lang: str):
    """(page, code, preceded by <!-- invalid -->) for every fenced block of ``lang``."""
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for m in _FENCE.finditer(text):
            if m.group("lang") != lang:
                continue
            before = text[: m.start()].rstrip().splitlines()[-1:] or [""]
            body = "\n".join(line[len(m.group("indent")):]
                             for line in m.group("body").splitlines())
            yield page.relative_to(REPO), body, before[0].strip() == "<!-- invalid -->"


def _commands(body: str):
    """``statetx`` command lines of a bash block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("statetx "):
            yield shlex.split(line, comments=True)[1:]


# ---------------------------------------------------------------------------------------------
# docs site
# ---------------------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: "
                        "pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not "
                        "installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site),
         "--config-file", str(REPO / "mkdocs.yml")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed ({time.perf_counter() - t0:.0f} s):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    cli = (site / "cli" / "index.html").read_text()
    assert "statetx tx train" in cli and "data.kwargs.toml_config_path" in cli
    assert "could not be generated" not in cli
    api = (site / "api" / "model" / "index.html").read_text()
    assert "predict_split" in api and "from_arc_state" in api
    evaluation = (site / "evaluation" / "index.html").read_text()
    assert "fit_all_baselines" in evaluation  # the snippet was included


def test_toml_examples_are_valid_split_specs():
    from statetx.config import SplitConfig
    from statetx.errors import SplitConfigError

    seen = 0
    for page, body, invalid in _blocks("toml"):
        seen += 1
        if invalid:
            with pytest.raises(SplitConfigError):
                SplitConfig.from_toml(body)
        else:
            try:
                SplitConfig.from_toml(body)
            except SplitConfigError as exc:  # pragma: no cover - message for the reader
                pytest.fail(f"{page}: TOML example is not a valid split spec: {exc}\n{body}")
    assert seen >= 5


def test_cli_examples_parse():
    from statetx import runconfig as R
    from statetx.cli import build_parser, cmd_train

    parser = build_parser()
    seen = 0
    for page, body, _ in _blocks("bash"):
        for argv in _commands(body):
            seen += 1
            try:
                ns, extra = parser.parse_known_args(argv)
            except SystemExit:  # argparse printed the reason
                pytest.fail(f"{page}: `statetx {' '.join(argv)}` does not parse")
            if getattr(ns, "func", None) is cmd_train:
                overrides = list(ns.overrides) + [e for e in extra if not e.startswith("-")]
                extra = [e for e in extra if e.startswith("-")]
                try:
                    with warnings.catch_warnings():  # "has no effect" notices are expected
                        warnings.simplefilter("ignore")
                        res = R.resolve(overrides)
                        R.plan_training(res, check_data=False)
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"{page}: `statetx {' '.join(argv)}`: {exc}")
            assert not extra, f"{page}: unrecognised arguments {extra} in `statetx {argv}`"
    assert seen >= 10


# The examples are tiny: one thread each. On a busy 2-core machine several torch threads per
# process make them many times slower (oversubscription), not faster. numba (used by scanpy)
# resets OpenMP's thread count when it starts, so NUMBA_NUM_THREADS is set as well.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_compare_baselines_snippet_runs(tmp_path):
    source = SNIPPET.read_text()
    fast, n = re.subn(r"^MAX_STEPS = .*$", "MAX_STEPS = 4", source, count=1, flags=re.M)
    assert n == 1, "the snippet must define MAX_STEPS at the start of a line"
    script = tmp_path / "compare_baselines.py"
    script.write_text(fast)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, (
        f"the snippet failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out = proc.stdout
    for model in ("ST", "control_mean", "context_mean", "perturb_mean", "cell_mean", "linear"):
        assert re.search(rf"^{model}\s", out, re.M), f"no row for {model} in:\n{out}"
    assert "pearson_delta" in out


# ---------------------------------------------------------------------------------------------
# notebook
# ---------------------------------------------------------------------------------------------


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: "
                                   "pip install -e '.[docs]'")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"clear the outputs of cells {dirty} before committing the notebook"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert tagged and "MAX_STEPS" in tagged[0].source


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed: "
                                   "pip install -e '.[docs]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: "
                                   "pip install -e '.[docs]'")
    pytest.importorskip("ipykernel", reason="ipykernel (the Jupyter kernel) is not installed: "
                        "pip install -e '.[docs]'")
    from jupyter_client.kernelspec import NoSuchKernel

    for key, value in ONE_THREAD.items():  # inherited by the kernel; see ONE_THREAD
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except NoSuchKernel:  # pragma: no cover - environment problem, not a notebook problem
        pytest.skip("no 'python3' Jupyter kernel is registered (python -m ipykernel install)")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "reloaded model reproduces the predictions" in text
    assert (tmp_path / "zhao_quickstart_model" / "model.safetensors").is_file()
