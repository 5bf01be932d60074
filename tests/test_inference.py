"""Predictor precision: float32 by default, bf16 autocast on request (only where bf16 is native)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import stellarnet.common.hardware as hardware
from stellarnet.network import StellarNetModule, load_model, save_model_folder
from stellarnet.network.inference import Predictor, precision_name, resolve_precision

P = 256
NET = {
    "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [8, 8],
                         "kernel_sizes": [5, 3], "strides": [2, 2], "pool_size": 4, "dropout": 0.1, "out_dim": 16},
    "photometry": None,
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [16], "dropout": 0.1},
}
SPEC = {"grid": None, "n_pixels": P, "label_names": ["TEFF", "LOGG"], "label_units": ["K", "dex"],
        "label_mean": [4800.0, 2.5], "label_std": [600.0, 1.0], "phot_features": [],
        "class_tasks": {"stage": ["MS", "SG", "RGB", "RC"]}}


@pytest.fixture(scope="module")
def module() -> StellarNetModule:
    torch.manual_seed(0)
    return StellarNetModule(net=NET, data_spec=SPEC, log_figures=False).eval()


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has native bf16 (autocast works either way; emulated bf16 is only slow)."""
    monkeypatch.setattr(hardware, "cpu_bf16_supported", lambda: True)


def _spectra(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return (1.0 + 0.05 * g.standard_normal((n, P))).astype(np.float32), np.full((n, P), 0.02, np.float32)


@pytest.mark.parametrize("value,name", [("32", "32"), (32, "32"), ("fp32", "32"), ("32-true", "32"),
                                        ("bf16", "bf16"), ("BF16-mixed", "bf16"), ("auto", "auto")])
def test_precision_names(value, name):
    assert precision_name(value) == name


@pytest.mark.parametrize("value", ["16", "fp16", "half", None, "bf"])
def test_unknown_precision_is_refused(value, module):
    with pytest.raises(ValueError, match="precision must be one of '32', 'bf16' or 'auto'"):
        resolve_precision(value)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(module, precision=value)


def test_bf16_falls_back_to_float32_without_native_support(monkeypatch, module, caplog):
    monkeypatch.setattr(hardware, "cpu_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="stellarnet.network.inference"):
        assert Predictor(module, precision="bf16").precision == "32"
    assert "no native bf16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stellarnet.network.inference"):
        assert Predictor(module, precision="auto").precision == "32"  # auto: quietly float32
    assert caplog.text == ""


def test_default_is_float32(module):
    assert Predictor(module).precision == "32"


def _conv_dtypes(predictor: Predictor) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in predictor.net.modules() if isinstance(m, torch.nn.Conv1d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_runs_the_network_in_bf16_and_returns_float32(native_bf16, module):
    flux, err = _spectra()
    fp32 = Predictor(module)
    bf16 = Predictor(module, precision="bf16")
    assert bf16.precision == "bf16"
    seen32, seen16 = _conv_dtypes(fp32), _conv_dtypes(bf16)
    a = fp32.predict(flux, err, mc_samples=4, seed=1, batch_size=16)
    b = bf16.predict(flux, err, mc_samples=4, seed=1, batch_size=16)
    assert set(seen32) == {torch.float32} and set(seen16) == {torch.bfloat16}
    for key in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"):
        assert b[key].dtype == np.float32 and b[key].shape == a[key].shape
    assert b["class_probs"]["stage"].dtype == np.float32
    # bf16 keeps 8 mantissa bits: close to float32 on the label scale (std 600 K, 1 dex)
    diff = np.abs(b["labels"] - a["labels"]) / np.array([600.0, 1.0])
    assert diff.max() < 0.05
    np.testing.assert_allclose(b["class_probs"]["stage"], a["class_probs"]["stage"], atol=0.05)
    # a per-call override equals the constructor setting
    c = fp32.predict(flux, err, mc_samples=4, seed=1, batch_size=16, precision="bf16")
    np.testing.assert_array_equal(c["labels"], b["labels"])
    assert fp32.precision == "32"


def test_load_model_passes_precision(native_bf16, module, tmp_path):
    folder = save_model_folder(module, tmp_path / "model")
    assert load_model(folder).precision == "32"
    assert load_model(folder, precision="bf16").precision == "bf16"
    assert load_model(folder, precision="auto").precision == "bf16"


# ------------------------------------------------- mutants that survived the first benchmark
def test_batch_size_one_and_empty_inputs(tmp_path):
    """batch_size=1 is valid and gives the batched numbers; zero spectra give empty (0, L) arrays."""
    from conftest import tiny_model_folder

    from stellarnet.network import load_model

    model = load_model(tiny_model_folder(tmp_path / "m", photometry=False, dropout=0.0))
    rng = np.random.default_rng(4)
    flux = (1 - 0.2 * rng.random((3, model.n_pixels))).astype(np.float32)
    err = np.full_like(flux, 0.01)
    one = model.predict(flux, err, batch_size=1)
    many = model.predict(flux, err, batch_size=128)
    np.testing.assert_allclose(one["labels"], many["labels"], rtol=1e-5, atol=1e-4)
    empty = model.predict(flux[:0], err[:0])
    for key in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"):
        assert empty[key].shape == (0, 2), key
    assert empty["class_probs"]["stage"].shape == (0, 4) and empty["stellarnet_flag"].shape == (0,)


def test_total_sigma_adds_the_parts_in_quadrature(tmp_path):
    """σ_total = √(σ_aleatoric² + σ_epistemic²) after the folder's σ scale (MC dropout on)."""
    from conftest import tiny_model_folder

    from stellarnet.network import load_model

    model = load_model(tiny_model_folder(tmp_path / "m", photometry=False, dropout=0.3))
    model.sigma_scale = np.array([1.7, 0.6], np.float32)
    rng = np.random.default_rng(5)
    flux = (1 - 0.2 * rng.random((5, model.n_pixels))).astype(np.float32)
    out = model.predict(flux, np.full_like(flux, 0.01), mc_samples=8, seed=3)
    assert (out["sigma_epistemic"] > 0).all()
    np.testing.assert_allclose(out["sigma_total"], np.hypot(out["sigma_aleatoric"], out["sigma_epistemic"]), rtol=1e-5)


def test_network_sigma_has_a_noise_term_that_grows_as_the_snr_falls(tmp_path):
    """σ = √((s σ_head)² + (k n)²), n = 1/SNR (the median error of the good pixels): what
    ``validation_calibration`` fits so that the σ follows the noise below the training S/N cut."""
    from conftest import tiny_model_folder

    from stellarnet.network import load_model

    model = load_model(tiny_model_folder(tmp_path / "m", photometry=False, dropout=0.0))
    model.sigma_scale = np.array([1.3, 0.8], np.float32)
    rng = np.random.default_rng(2)
    flux = (1 - 0.2 * rng.random((6, model.n_pixels))).astype(np.float32)
    k = np.array([400.0, 1.5], np.float32)
    for noise in (0.005, 0.04):  # S/N 200 and 25
        err = np.full_like(flux, noise)
        err[:, :50] = 1e3  # pixels with huge errors are masked and do not count
        model.sigma_noise_scale = None
        base = model.predict(flux, err)
        model.sigma_noise_scale = k
        out = model.predict(flux, err)
        np.testing.assert_allclose(out["flux_noise"], noise, rtol=1e-6)
        np.testing.assert_allclose(out["sigma_aleatoric"] ** 2, base["sigma_aleatoric"] ** 2 + (k * noise) ** 2, rtol=1e-4)
        np.testing.assert_allclose(out["labels"], base["labels"])  # σ only
    with pytest.raises(Exception, match="sigma_noise_scale"):
        from stellarnet.network.inference import Predictor

        module = model.module
        module.data_spec["sigma_noise_scale"] = [1.0, 2.0, 3.0]
        Predictor(module)


def test_bf16_native_asks_the_gpu(monkeypatch):
    from stellarnet.network.inference import _bf16_native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert _bf16_native(torch.device("cuda")) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert _bf16_native(torch.device("cuda")) is False
    assert _bf16_native(torch.device("meta")) is False
