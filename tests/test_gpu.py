"""CUDA paths of the training loop (skipped without a GPU; CI has none, the lent GPU runs them).

Cells kept on the device vs gathered on the host, the deferred non-finite check, compile, and a
CUDA-trained model predicting on the CPU after pickling.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from test_model import SPEC, small_model

from statetx.train import TrainingError, load_checkpoint_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXACT = dict(device="cuda", precision="32", matmul_precision="highest")


def _weights(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in m.network_.state_dict().items()}


def test_cells_on_device_train_like_cells_on_host(synth):
    torch.backends.cudnn.deterministic = True
    a = small_model(max_steps=6, data_on_device="always", **EXACT).fit(synth, SPEC)
    b = small_model(max_steps=6, data_on_device="never", **EXACT).fit(synth, SPEC)
    wa, wb = _weights(a), _weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    la, lb = a.history_["train_loss"], b.history_["train_loss"]
    assert la.iloc[-1] == pytest.approx(lb.iloc[-1], rel=1e-5)


def test_non_finite_on_cuda_names_the_step_and_writes_nothing_after(synth, tmp_path):
    m = small_model(max_steps=12, ckpt_every_n_steps=4, val_freq=100, **EXACT)
    m.fit(synth, SPEC)  # builds everything once; the second fit below re-runs from scratch
    from statetx import train as train_mod

    orig = train_mod.Trainer.losses
    calls = {"n": 0}

    def poisoned(self, batch, module=None, *, training=False):
        parts = orig(self, batch, module, training=training)
        if training:
            calls["n"] += 1
            if calls["n"] == 6:  # the 6th training step's loss is NaN
                parts["main_loss"] = parts["main_loss"] * float("nan")
        return parts

    train_mod.Trainer.losses = poisoned
    try:
        with pytest.raises(TrainingError, match=r"at step 6\b"):
            small_model(max_steps=12, ckpt_every_n_steps=4, val_freq=100, **EXACT).fit(
                synth, SPEC, output_dir=tmp_path)
    finally:
        train_mod.Trainer.losses = orig
    steps = sorted(load_checkpoint_file(p)["train_state"]["step"]
                   for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert steps and max(steps) == 4  # step=4 (and last) written, nothing from step 8 on


def test_compiled_training_matches_eager(synth):
    a = small_model(max_steps=6, compile=True, **EXACT).fit(synth, SPEC)
    b = small_model(max_steps=6, **EXACT).fit(synth, SPEC)
    la, lb = (m.history_["train_loss"].dropna() for m in (a, b))
    assert np.allclose(la, lb, rtol=1e-3)


def test_bf16_cuda_model_pickles_to_cpu(synth):
    m = small_model(max_steps=20, device="cuda").fit(synth, SPEC)
    losses = m.history_["train_loss"].dropna()  # rows of validation-only steps carry no loss
    assert len(losses) and np.isfinite(losses).all()
    x = np.random.default_rng(0).random((2, 8, m.n_features_in_), dtype=np.float32)
    on_gpu = m.predict_sets(x, ["P0", "P1"])
    cpu = pickle.loads(pickle.dumps(m))  # weights travel as CPU tensors
    assert next(cpu.network_.parameters()).device.type == "cpu"
    assert np.allclose(cpu.predict_sets(x, ["P0", "P1"]), on_gpu, atol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_bf16_training_matches_eager(synth, mode):
    """CUDA's default precision (bf16 autocast): forward + loss compiled as one graph (CUDA
    graphs with reduce-overhead) train like eager."""
    prev = torch.get_float32_matmul_precision()
    a = small_model(max_steps=8, device="cuda", compile=True, compile_mode=mode).fit(synth, SPEC)
    assert torch.get_float32_matmul_precision() == prev  # restored after training at "highest"
    b = small_model(max_steps=8, device="cuda").fit(synth, SPEC)
    la, lb = (m.history_["train_loss"].dropna() for m in (a, b))
    assert np.allclose(la, lb, rtol=2e-2)


def test_read_depth_downsampling_and_options_on_cuda(synth):
    """downsample thins batches on the GPU (cells kept there), seeded; drop_last, pad_from and
    val_from_test work there too."""
    kw = dict(max_steps=6, val_freq=3, downsample=0.5, drop_last=True, pad_from="chunk",
              val_from_test=True, data_on_device="always", **EXACT)
    spec = {"training": {"data": "train"}, "zeroshot": {"data.CT2": "test"}}
    a, b = small_model(**kw).fit(synth, spec), small_model(**kw).fit(synth, spec)
    np.testing.assert_array_equal(a.history_["train_loss"], b.history_["train_loss"])
    assert a.history_["val_loss"].notna().sum() == 2
    plain = small_model(**{**kw, "downsample": None}).fit(synth, spec)
    assert not np.allclose(a.history_["train_loss"].dropna(),
                           plain.history_["train_loss"].dropna())


def test_pseudobulk_prediction_on_cuda_equals_cell_means(synth):
    m = small_model(max_steps=6, **EXACT).fit(synth, SPEC)
    pred, _ = m.predict_split("test")
    bulk, _ = m.predict_split("test", pseudobulk=True)
    cols = [m.pert_col, m.cell_type_key]
    means = pred.to_df().groupby([pred.obs[c].astype(str) for c in cols]).mean()
    for i, (p, ct) in enumerate(zip(bulk.obs[cols[0]].astype(str),
                                    bulk.obs[cols[1]].astype(str))):
        np.testing.assert_allclose(bulk.X[i], means.loc[(p, ct)].to_numpy(), atol=1e-4)
