"""Error-aware, convention-free network inputs (encoders.RobustInputs) and training-time augmentation
(augment.SpectrumAugment): what they promise, on synthetic spectra with known noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stellarnet.io import grids
from stellarnet.io.grids import LSF_SIGMA_PIX
from stellarnet.network.augment import SpectrumAugment
from stellarnet.network.encoders import RobustInputs, SpectralConvEncoder, der_snr_noise, spectral_input_channels
from stellarnet.network.module import StellarNetModule

P = grids.n_pixels("dr12")
NOISE = 0.01


def spectra(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continuum-normalized spectra with resolved lines (σ = the APOGEE LSF) at S/N 100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(P, dtype=torch.float32)
    depth = 0.1 + 0.4 * torch.rand(n, 1, generator=g)
    flux = 1 - depth * torch.exp(-0.5 * (((x % 23) - 11) / LSF_SIGMA_PIX) ** 2)
    flux = flux + NOISE * torch.randn(n, P, generator=g)
    return flux, torch.full((n, P), NOISE), torch.ones(n, P)


def test_der_snr_measures_white_noise_from_the_flux_alone():
    g = torch.Generator().manual_seed(1)
    flux = 1 + 0.02 * torch.randn(4, P, generator=g)
    noise = der_snr_noise(flux, torch.ones(4, P, dtype=torch.bool))
    assert torch.allclose(noise[:, 0], torch.full((4,), 0.02), rtol=0.06)


def test_inputs_do_not_depend_on_the_error_arrays_scale():
    flux, err, mask = spectra()
    ri = RobustInputs(P)
    base = ri(flux, err, mask)
    for factor in (0.5, 2.0, 7.0):
        assert torch.allclose(ri(flux, err * factor, mask), base, atol=1e-6)


def test_a_corrupted_pixel_with_an_inflated_error_barely_enters():
    flux, err, mask = spectra(4)
    ri = RobustInputs(P)
    bad_flux, bad_err = flux.clone(), err.clone()
    bad_flux[:, 3000] -= 0.3  # a 30 σ sky-line residual ...
    bad_err[:, 3000] *= 5.0  # ... whose error the pipeline inflated 5x
    a, b = ri(flux, bad_err, mask), ri(bad_flux, bad_err, mask)  # same errors, flux clean vs corrupted
    assert (b[:, 0, 3000] - a[:, 0, 3000]).abs().max() < 0.03 * 0.3  # < 3 % of the deviation gets through
    assert torch.allclose(a[:, :, :2990], b[:, :, :2990], atol=1e-6)  # and nothing else moves
    old_a, old_b = spectral_input_channels(flux, bad_err, mask), spectral_input_channels(bad_flux, bad_err, mask)
    assert torch.allclose(old_b[:, 0, 3000] - old_a[:, 0, 3000], torch.full((4,), -0.3), atol=1e-5)  # in full


def test_renormalization_removes_a_smooth_continuum_error():
    flux, err, mask = spectra()
    x = torch.linspace(-1, 1, P)
    tilted = flux * (1 + 0.02 * x + 0.015 * (x**2 - 1 / 3))
    ri, raw = RobustInputs(P), RobustInputs(P, renormalize_degree=None)
    d_robust = (ri(tilted, err, mask)[:, 0] - ri(flux, err, mask)[:, 0]).abs().mean()
    d_raw = (raw(tilted, err, mask)[:, 0] - raw(flux, err, mask)[:, 0]).abs().mean()
    assert d_raw > 0.008 and d_robust < 0.05 * d_raw


def test_flattened_errors_change_inputs_little():
    flux, err, mask = spectra()
    err = err.clone()
    err[:, ::7] *= 1.4  # e.g. model-mismatch pixels with inflated errors
    flat = torch.full_like(err, float(err.median()))
    ri = RobustInputs(P)
    d = (ri(flux, flat, mask) - ri(flux, err, mask)).abs()
    assert d[:, 0].max() < 0.2 * 0.5 and d[:, 0].mean() < 0.005


def test_augmentation_only_in_training_and_keeps_masked_pixels():
    flux, err, mask = spectra(64)
    mask[:, 100:200] = 0
    flux[:, 100:200], err[:, 100:200] = 1.0, 1e3
    aug = SpectrumAugment(P)
    aug.eval()
    f, e, m = aug(flux, err, mask)
    assert f is flux and e is err and m is mask
    aug.train()
    torch.manual_seed(0)
    f, e, m = aug(flux, err, mask)
    assert torch.equal(m, mask)  # mask_fraction 0 (the default): no pixel flagged
    assert not torch.allclose(f, flux)
    assert torch.equal(f[:, 100:200], flux[:, 100:200]) and torch.equal(e[:, 100:200], err[:, 100:200])
    assert torch.isfinite(f).all() and (e > 0).all() and torch.isfinite(e).all()
    changed_err = (e != err).any(1).float().mean()
    assert 0.3 < changed_err < 1.0  # each effect is drawn for a share of the spectra


def test_augmentation_flags_scattered_short_runs_as_prepare_spectrum_leaves_them():
    from stellarnet.preparation.spectra import BAD_PIXEL_ERR

    flux, err, mask = spectra(400)
    aug = SpectrumAugment(P, prob=1.0, mask_fraction=0.08, continuum=0.0, outlier_fraction=0.0, err_scale=(1.0, 1.0),
                          err_flat_prob=0.0, rv_pixels=0.0, lsf=(0.0, 0.0)).train()
    torch.manual_seed(1)
    f, e, m = aug(flux, err, mask)
    hit = (m == 0) & (mask > 0)
    share = hit.float().mean(1)
    assert 0.025 < float(share.mean()) < 0.055  # U(0, 8 %) per spectrum, about 4 % on average
    assert float(share.max()) < 0.1 and float(share.min()) < 0.01
    assert torch.all(f[hit] == 1.0) and torch.all(e[hit] == BAD_PIXEL_ERR)
    assert torch.equal(f[~hit], flux[~hit]) and torch.equal(e[~hit], err[~hit])
    starts = hit[:, 1:] & ~hit[:, :-1]  # runs are short: pixels per run ~1.75
    assert 1.4 < float(hit[:, 1:].sum() / starts.sum()) < 2.1
    with pytest.raises(ValueError, match="mask_fraction"):
        SpectrumAugment(P, mask_fraction=0.6)


def test_augmentation_lowers_the_snr_with_noise_its_error_array_describes():
    clean, err, mask = spectra(400)  # S/N 100 ...
    err[:200] = 0.5 * NOISE  # ... and 200
    mask[:, :50] = 0
    aug = SpectrumAugment(P, prob=0.0, continuum=0.0, outlier_fraction=0.0, err_scale=(1.0, 1.0), err_flat_prob=0.0,
                          rv_pixels=0.0, lsf=(0.0, 0.0), snr_prob=1.0, snr_min=10.0).train()
    torch.manual_seed(2)
    f, e, m = aug(clean, err, mask)
    assert torch.equal(m, mask) and torch.equal(f[:, :50], clean[:, :50]) and torch.equal(e[:, :50], err[:, :50])
    k = e[:, 50:].median(1).values / err[:, 50:].median(1).values  # the error grew by k ≥ 1, the same on every pixel
    assert torch.allclose(e[:, 50:], err[:, 50:] * k[:, None], rtol=1e-5)
    snr_before, snr_after = 1.0 / err[:, 50:].median(1).values, 1.0 / e[:, 50:].median(1).values
    assert bool((snr_after <= snr_before + 1e-3).all()) and bool((snr_after >= 10.0 - 1e-3).all())
    # log-uniform between 10 and the spectrum's own S/N: the middle of the logs on average
    mid = 0.5 * (np.log(10.0) + torch.log(snr_before).numpy())
    assert abs(float(np.mean(torch.log(snr_after).numpy() - mid))) < 0.1
    # the added noise is what the new errors say on top of the old: std (f − flux) = σ √(k² − 1)
    added = (f[:, 50:] - clean[:, 50:]).std(1) / (err[:, 50:].median(1).values * torch.sqrt(k**2 - 1).clamp_min(1e-6))
    big = k > 1.5
    assert big.sum() > 200 and torch.allclose(added[big], torch.ones(int(big.sum())), atol=0.06)
    # spectra already below snr_min, and every spectrum with snr_prob 0, are left as they were
    low = err * 40.0  # S/N 2.5 and 5
    f2, e2, _ = aug(clean, low, mask)
    assert torch.equal(f2, clean) and torch.equal(e2, low)
    with pytest.raises(ValueError, match="snr_prob"):
        SpectrumAugment(P, snr_prob=1.5)


def test_lower_snr_copy_is_the_augmentation_on_every_spectrum_and_seeded():
    from stellarnet.network.augment import lower_snr_copy

    flux, err, mask = (a.numpy() for a in spectra(64))
    mask[:, :30] = 0
    f1, e1 = lower_snr_copy(flux, err, mask, seed=4)
    f2, e2 = lower_snr_copy(flux, err, mask, seed=4)
    assert np.array_equal(f1, f2) and np.array_equal(e1, e2)
    assert not np.array_equal(f1, lower_snr_copy(flux, err, mask, seed=5)[0])
    snr = 1.0 / np.median(e1[:, 30:], axis=1)
    assert np.all((snr >= 10.0 - 1e-3) & (snr <= 100.0 + 1e-3)) and np.all(snr < 99.0)  # every spectrum lowered
    assert np.array_equal(f1[:, :30], flux[:, :30]) and np.array_equal(e1[:, :30], err[:, :30])


def _tiny_module(augment: dict | None) -> StellarNetModule:
    spec = {"grid": "dr12", "n_pixels": P, "label_names": ["TEFF", "LOGG"], "label_units": ["K", "dex"],
            "label_mean": [4800.0, 2.5], "label_std": [500.0, 1.0], "phot_features": [], "class_tasks": {}}
    net = {"spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [4, 4],
                                "kernel_sizes": [5, 5], "strides": [8, 8], "pool_size": 8, "out_dim": 16,
                                "inputs": "robust"},
           "photometry": None, "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [16]}}
    return StellarNetModule(net=net, data_spec=spec, augment=augment)


def test_network_labels_invariant_to_error_convention_and_augmentation_off_at_inference():
    torch.manual_seed(0)
    module = _tiny_module({"prob": 1.0}).eval()
    assert module.augment is not None and isinstance(module.spectral_encoder, SpectralConvEncoder)
    flux, err, mask = spectra(8)
    with torch.no_grad():
        a = module.predict_batch(flux, err, mask)
        b = module.predict_batch(flux, err * 2.0, mask)
        c = module.predict_batch(flux, err, mask)
    for k in ("labels", "sigma_total"):
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-4)
        assert torch.equal(a[k], c[k])  # eval mode: no augmentation, deterministic
    assert _tiny_module(None).augment is None and _tiny_module({"enabled": False}).augment is None
    with pytest.raises(ValueError, match="inputs"):
        SpectralConvEncoder(P, inputs="magic")
    with pytest.raises(ValueError, match="lo, hi"):
        SpectrumAugment(P, lsf=(0.3, -0.3))


def test_training_step_sees_augmented_spectra():
    torch.manual_seed(0)
    module = _tiny_module({"prob": 1.0})
    module.train()
    flux, err, mask = spectra(8)
    seen = {}
    orig = module._forward_batch
    module._forward_batch = lambda batch: (seen.setdefault("flux", batch["flux"]), orig(batch))[1]  # type: ignore
    batch = {"flux": flux, "flux_err": err, "pix_mask": mask, "labels": torch.zeros(8, 2),
             "label_err": torch.zeros(8, 2), "label_mask": torch.ones(8, 2), "classes": torch.zeros(8, 0, dtype=torch.long)}
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    loss = module.training_step(batch, 0)
    assert loss is not None and torch.isfinite(loss)
    assert not torch.allclose(seen["flux"], flux)
