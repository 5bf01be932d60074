"""Tests for stellarnet.network: encoders, heads, losses, the LightningModule and inference."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from stellarnet.evaluation.tensorboard import ValidationFigures
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stellarnet.network import (
    CheckpointError,
    ClassificationHead,
    HeteroscedasticHead,
    PhotometryMLP,
    SpectralConvEncoder,
    StellarNetModule,
    TrunkMLP,
    classification_loss,
    gaussian_nll,
    load_model,
    save_model_folder,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "stellarnet" / "conf"
LABELS = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
PHOT = ["JH0", "HK0", "JK0", "BPRP0", "M_K", "M_G"]
TASKS = {
    "spectral_type": ["F", "G", "K", "M"],
    "luminosity_class": ["I", "II", "III", "IV", "V"],
    "stage": ["MS", "SG", "RGB", "RC"],
}
P_SMALL = 160

TINY_NET = {
    "spectral_encoder": {
        "_target_": "stellarnet.network.encoders.SpectralConvEncoder",
        "channels": [8, 16],
        "kernel_sizes": [5, 3],
        "strides": [2, 2],
        "pool_size": 8,
        "dropout": 0.1,
        "out_dim": 32,
    },
    "photometry": {"_target_": "stellarnet.network.encoders.PhotometryMLP", "hidden": [16], "out_dim": 8},
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [64], "dropout": 0.1},
    "regression_head": {"_target_": "stellarnet.network.heads.HeteroscedasticHead"},
    "classification_head": {"_target_": "stellarnet.network.heads.ClassificationHead"},
}


def make_spec(n_pixels: int = P_SMALL, grid: str | None = None) -> dict:
    return {
        "grid": grid,
        "n_pixels": n_pixels,
        "wavelength": np.linspace(15100.0, 16900.0, n_pixels).tolist(),
        "label_names": LABELS,
        "label_units": ["K", "dex", "dex", "dex"],
        "label_mean": [4800.0, 2.5, -0.2, 0.1],
        "label_std": [600.0, 1.0, 0.3, 0.1],
        "phot_features": PHOT,
        "phot_mean": [0.6, 0.15, 0.75, 1.2, -1.0, 1.5],
        "phot_std": [0.1, 0.05, 0.15, 0.3, 1.5, 1.5],
        "class_tasks": TASKS,
        "class_weights": {"stage": [1.0, 1.0, 1.0, 2.0]},
    }


def make_module(spec: dict | None = None, **kw) -> StellarNetModule:
    kw.setdefault("optimizer", {"lr": 3e-3, "weight_decay": 1e-4})
    kw.setdefault("log_figures", False)
    return StellarNetModule(net=TINY_NET, data_spec=spec or make_spec(), **kw)


class SyntheticStars(torch.utils.data.Dataset):
    """Spectra that depend linearly on four standardized labels; classes are label bins.

    Yields the batch dict of docs/architecture.md exactly (dtypes and shapes).
    """

    def __init__(self, n: int, n_pixels: int = P_SMALL, seed: int = 0, missing_frac: float = 0.1) -> None:
        g = np.random.default_rng(seed)
        basis = np.random.default_rng(123).normal(size=(4, n_pixels)).astype(np.float32)  # same for all splits
        self.z = g.normal(size=(n, 4)).astype(np.float32)
        noise = 0.005 * g.normal(size=(n, n_pixels)).astype(np.float32)
        self.flux = (1.0 + 0.03 * self.z @ basis + noise).astype(np.float32)
        self.err = np.full((n, n_pixels), 0.005, np.float32)
        self.pix_mask = np.ones((n, n_pixels), np.float32)
        bad = g.random((n, n_pixels)) < 0.02
        self.flux[bad], self.err[bad], self.pix_mask[bad] = 1.0, 1.0e3, 0.0
        self.phot = g.normal(size=(n, len(PHOT))).astype(np.float32)
        self.phot_mask = (g.random((n, len(PHOT))) > 0.2).astype(np.float32)
        self.phot[self.phot_mask == 0] = 0.0
        self.label_mask = (g.random((n, 4)) > missing_frac).astype(np.float32)
        self.labels = np.where(self.label_mask > 0, self.z, 0.0).astype(np.float32)
        self.label_err = np.where(self.label_mask > 0, 0.02, 0.0).astype(np.float32)
        classes = np.stack(
            [np.digitize(self.z[:, 0], [-1, 0, 1]), np.digitize(self.z[:, 1], [-1.2, -0.4, 0.4, 1.2]),
             np.digitize(self.z[:, 2], [-1, 0, 1])], axis=1
        ).astype(np.int64)
        classes[g.random((n, 3)) < 0.1] = -1
        self.classes = classes

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "flux": torch.from_numpy(self.flux[i]),
            "flux_err": torch.from_numpy(self.err[i]),
            "pix_mask": torch.from_numpy(self.pix_mask[i]),
            "photometry": torch.from_numpy(self.phot[i]),
            "phot_mask": torch.from_numpy(self.phot_mask[i]),
            "labels": torch.from_numpy(self.labels[i]),
            "label_err": torch.from_numpy(self.label_err[i]),
            "label_mask": torch.from_numpy(self.label_mask[i]),
            "classes": torch.from_numpy(self.classes[i]),
            "index": torch.tensor(i, dtype=torch.int64),
        }


def make_batch(n: int = 8, seed: int = 0, n_pixels: int = P_SMALL) -> dict[str, torch.Tensor]:
    ds = SyntheticStars(n, n_pixels, seed)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def loader(ds: torch.utils.data.Dataset, shuffle: bool = False, batch_size: int = 64) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def trainer(tmp: Path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=str(tmp), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fitted for a few epochs on the synthetic linear survey (TensorBoard logger on)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("fit")
    module = make_module(
        optimizer={"lr": 1e-2}, scheduler={"name": "onecycle", "pct_start": 0.2}, log_figures=True, figure_every_n_epochs=5
    )
    train_ds, val_ds = SyntheticStars(1024, seed=1), SyntheticStars(256, seed=2)
    tb = pl.loggers.TensorBoardLogger(str(tmp), name="tb")
    tr = trainer(tmp, max_epochs=10, logger=tb, log_every_n_steps=5, num_sanity_val_steps=0,
                 callbacks=[ValidationFigures()])
    tr.fit(module, loader(train_ds, shuffle=True), loader(val_ds))
    return {"module": module, "trainer": tr, "tmp": tmp, "val": val_ds, "tb_dir": Path(tb.log_dir)}


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def test_batch_matches_contract():
    b = make_batch(4)
    f32 = ["flux", "flux_err", "pix_mask", "photometry", "phot_mask", "labels", "label_err", "label_mask"]
    assert all(b[k].dtype == torch.float32 for k in f32)
    assert b["classes"].dtype == torch.int64 and b["classes"].shape == (4, 3)
    assert b["index"].dtype == torch.int64 and b["index"].shape == (4,)
    assert b["flux"].shape == (4, P_SMALL) and b["labels"].shape == (4, 4) and b["photometry"].shape == (4, 6)


@pytest.mark.parametrize("n_pixels", [7514, 7214])
def test_spectral_encoder_shapes_on_apogee_grids(n_pixels):
    enc = SpectralConvEncoder(n_pixels, channels=[4, 8, 8, 8], kernel_sizes=[8, 5, 5, 3], strides=[4, 4, 2, 2], out_dim=24)
    x = torch.ones(3, n_pixels)
    out = enc(x, torch.full_like(x, 0.01), torch.ones_like(x))
    assert out.shape == (3, 24) and torch.isfinite(out).all()
    enc.eval()  # the two stages MC dropout uses compose to the full encoder
    conv = enc.conv_features(x, torch.full_like(x, 0.01), torch.ones_like(x))
    assert conv.shape == (3, 8 * 16)
    assert torch.allclose(enc.project(conv), enc(x, torch.full_like(x, 0.01), torch.ones_like(x)))
    with pytest.raises(ValueError, match="7000"):
        enc(torch.ones(2, 7000), torch.ones(2, 7000), torch.ones(2, 7000))


def test_spectral_encoder_ignores_masked_pixels_and_rejects_too_much_stride():
    enc = SpectralConvEncoder(P_SMALL, channels=[4, 8], kernel_sizes=[5, 3], strides=[2, 2], pool_size=8, out_dim=8).eval()
    b = make_batch(2)
    b2 = {k: v.clone() for k, v in b.items()}
    bad = torch.zeros(P_SMALL, dtype=torch.bool)
    bad[10:20] = True
    for d in (b, b2):
        d["pix_mask"][:, bad] = 0.0
    b2["flux"][:, bad] = 7.0  # garbage under the mask
    b2["flux_err"][:, bad] = float("inf")
    assert torch.allclose(enc(b["flux"], b["flux_err"], b["pix_mask"]), enc(b2["flux"], b2["flux_err"], b2["pix_mask"]))
    with pytest.raises(ValueError, match="pool_size"):
        SpectralConvEncoder(100, channels=[4, 4], kernel_sizes=[3, 3], strides=[4, 4], pool_size=16)



def test_spectral_encoder_linear_branch_sees_single_pixels():
    """The full-resolution linear branch keeps per-pixel weights: a change of one pixel that the
    strided convolutions see only blurred reaches the features through its own weight."""
    torch.manual_seed(0)
    kw = dict(channels=[4, 8], kernel_sizes=[5, 3], strides=[2, 2], pool_size=8, out_dim=8, dropout=0.0)
    enc = SpectralConvEncoder(P_SMALL, linear_dim=6, **kw).eval()
    b = make_batch(2)
    conv = enc.conv_features(b["flux"], b["flux_err"], b["pix_mask"])
    assert conv.shape == (2, 8 * 8 + 6) and enc.fc.in_features == 8 * 8 + 6
    with torch.no_grad():
        enc.linear[0].weight.zero_()
        enc.linear[0].weight[3, 17] = 2.0
    flux2 = b["flux"].clone()
    flux2[:, 17] -= 0.05  # a 5 % deeper line in one pixel
    lin = enc.conv_features(flux2, b["flux_err"], b["pix_mask"])[:, 64:] - enc.conv_features(
        b["flux"], b["flux_err"], b["pix_mask"])[:, 64:]
    scale = 2.0 / torch.sqrt(enc.linear[1].running_var[3] + enc.linear[1].eps)
    assert torch.allclose(lin[:, 3], torch.full((2,), -0.05) * scale, atol=1e-6)
    assert torch.allclose(lin[:, [0, 1, 2, 4, 5]], torch.zeros(2, 5))
    # a masked pixel contributes nothing, whatever its flux
    mask2 = b["pix_mask"].clone()
    mask2[:, 17] = 0.0
    flux3 = b["flux"].clone()
    flux3[:, 17] = 9.0
    assert torch.allclose(enc.conv_features(flux3, b["flux_err"], mask2)[:, 64:],
                          enc.conv_features(b["flux"], b["flux_err"], mask2)[:, 64:], atol=1e-6)
    with pytest.raises(ValueError, match="linear_dim"):
        SpectralConvEncoder(P_SMALL, linear_dim=-1, **kw)

def test_photometry_mlp_shapes_and_feature_dropout():
    torch.manual_seed(0)
    mlp = PhotometryMLP(6, hidden=[16], out_dim=8, dropout=0.0, feature_dropout=0.0, drop_all_prob=1.0)
    x, m = torch.randn(5, 6), torch.ones(5, 6)
    mlp.eval()
    out_eval = mlp(x, m)
    assert out_eval.shape == (5, 8)
    no_phot = mlp(torch.zeros(5, 6), torch.zeros(5, 6))
    assert not torch.allclose(out_eval, no_phot)
    mlp.train()  # drop_all_prob=1: training sees "no photometry" for every star
    assert torch.allclose(mlp(x, m), no_phot)
    # a missing feature is ignored whatever its value (even NaN)
    mlp.eval()
    x2, m2 = x.clone(), m.clone()
    m2[:, 2] = 0
    x3 = x2.clone()
    x3[:, 2] = float("nan")
    assert torch.allclose(mlp(x2, m2), mlp(x3, m2))


def test_heads_shapes_and_log_var_bounds():
    trunk = TrunkMLP(40, hidden=[32, 16], dropout=0.1)
    h = trunk(torch.randn(7, 40))
    assert h.shape == (7, 16) and trunk.out_dim == 16
    head = HeteroscedasticHead(16, 4, log_var_min=-6.0, log_var_max=3.0)
    mean, log_var = head(h)
    assert mean.shape == log_var.shape == (7, 4)
    _, lv_big = head(1e4 * torch.randn(7, 16))
    assert (lv_big >= -6.0).all() and (lv_big <= 3.0).all()
    cls = ClassificationHead(16, 5)
    assert cls(h).shape == (7, 5)
    with pytest.raises(ValueError):
        HeteroscedasticHead(16, 4, log_var_min=1.0, log_var_max=0.0)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def test_gaussian_nll_hand_computed():
    mean = torch.tensor([[0.0, 1.0]])
    log_var = torch.tensor([[0.0, math.log(4.0)]])
    target = torch.tensor([[1.0, 3.0]])
    mask = torch.ones(1, 2)
    a = 0.5 * (0.0 + 1.0)  # var 1, residual 1
    b = 0.5 * (math.log(4.0) + 4.0 / 4.0)  # var 4, residual 2
    loss, per = gaussian_nll(mean, log_var, target, mask)
    assert per.tolist() == pytest.approx([a, b], rel=1e-6)
    assert loss.item() == pytest.approx((a + b) / 2, rel=1e-6)
    # catalogue error adds in quadrature: var = 1 + 1**2 = 2 for the first label, 4 + 0 for the second
    err = torch.tensor([[1.0, 0.0]])
    loss_e, per_e = gaussian_nll(mean, log_var, target, mask, label_err=err)
    a_e = 0.5 * (math.log(2.0) + 1.0 / 2.0)
    assert per_e.tolist() == pytest.approx([a_e, b], rel=1e-6)
    assert loss_e.item() == pytest.approx((a_e + b) / 2, rel=1e-6)
    loss_full, _ = gaussian_nll(mean, log_var, target, mask, full=True)
    assert loss_full.item() == pytest.approx((a + b) / 2 + 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_gaussian_nll_masked_labels_get_zero_gradient_and_normalization():
    torch.manual_seed(0)
    mean = torch.randn(4, 3, requires_grad=True)
    log_var = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3)
    err = torch.full((4, 3), 0.1)
    mask = torch.ones(4, 3)
    mask[0, 1] = mask[2, 0] = mask[3, 2] = 0
    target[0, 1] = float("nan")  # garbage under the mask must not leak
    err[2, 0] = float("inf")
    target[3, 2] = 1e30
    loss, per = gaussian_nll(mean, log_var, target, mask, err)
    assert torch.isfinite(loss)
    loss.backward()
    for i, j in [(0, 1), (2, 0), (3, 2)]:
        assert mean.grad[i, j].item() == 0.0 and log_var.grad[i, j].item() == 0.0
    assert (mean.grad[mask > 0] != 0).all()
    # normalized by the number of present labels (9), not B*L
    m, lv = mean.detach(), log_var.detach()
    keep = mask > 0
    v = lv.exp() + err**2
    elem = 0.5 * (v.log() + (target - m) ** 2 / v)
    assert loss.item() == pytest.approx(elem[keep].sum().item() / 9, rel=1e-5)
    assert per[0].item() == pytest.approx(elem[:, 0][keep[:, 0]].mean().item(), rel=1e-5)
    # nothing present: zero loss, zero gradient, no NaN
    mean.grad = None
    loss0, per0 = gaussian_nll(mean, log_var, target, torch.zeros(4, 3), err)
    loss0.backward()
    assert loss0.item() == 0.0 and (per0 == 0).all() and (mean.grad == 0).all()


def test_classification_loss_ignore_index_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, -1, 3, 2, -1, 1])
    keep = target >= 0
    expected = F.cross_entropy(logits[keep], target[keep])
    assert classification_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    exp_w = F.cross_entropy(logits[keep], target[keep], weight=w)
    assert classification_loss(logits, target, w).item() == pytest.approx(exp_w.item(), rel=1e-6)
    loss = classification_loss(logits, target)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).any()
    logits.grad = None
    none = classification_loss(logits, torch.full((6,), -1))
    none.backward()
    assert none.item() == 0.0 and (logits.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# module construction and configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_hydra_model_configs_instantiate_with_plain_hparams(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}"])
    spec = OmegaConf.create(make_spec(7514, "dr17"))  # a DictConfig, as an entry point may pass it
    module = instantiate(cfg.model, data_spec=spec)
    assert isinstance(module, StellarNetModule)
    out = module.eval()(torch.ones(2, 7514), torch.full((2, 7514), 0.01), torch.ones(2, 7514))
    assert out["mean"].shape == (2, 4) and set(out["logits"]) == set(TASKS)
    path = tmp_path / "hp.pt"
    torch.save(dict(module.hparams), path)
    hp = torch.load(path, weights_only=True)
    assert isinstance(hp["data_spec"], dict) and isinstance(hp["net"]["spectral_encoder"], dict)
    assert hp["data_spec"]["class_tasks"]["stage"] == TASKS["stage"]


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_weights"):
        make_module(loss_weights={"regresion": 1.0})
    spec = make_spec()
    spec["label_std"] = spec["label_std"][:3]
    with pytest.raises(ValueError, match="label_std"):
        make_module(spec)
    with pytest.raises(ValueError, match="nan_policy"):
        make_module(nan_policy="ignore")
    net = {**TINY_NET, "trunk": {"_target_": "os.system", "command": "echo pwned"}}
    with pytest.raises(ValueError, match="not allowed"):
        StellarNetModule(net=net, data_spec=make_spec())
    with pytest.raises(ValueError, match="scheduler"):
        m = make_module(scheduler={"name": "plateau"})
        m.trainer = trainer(Path("."), max_steps=1)
        m.configure_optimizers()


def test_spectra_only_model_ignores_photometry():
    m = StellarNetModule(net={**TINY_NET, "photometry": None}, data_spec=make_spec()).eval()
    b = make_batch(3)
    out1 = m._forward_batch(b)
    out2 = m(b["flux"], b["flux_err"], b["pix_mask"])
    assert m.photometry_encoder is None and torch.allclose(out1["mean"], out2["mean"])


# ----------------------------------------------------------------------------------------------
# training, logging, test outputs
# ----------------------------------------------------------------------------------------------
def test_fit_learns_linear_relation_well_above_chance(trained):
    module, tr = trained["module"], trained["trainer"]
    m = tr.callback_metrics
    # physical-unit MAE: labels have std (600 K, 1, 0.3, 0.1 dex); predicting the mean gives ~0.8 std
    for name, std in zip(LABELS, [600.0, 1.0, 0.3, 0.1]):
        assert float(m[f"val/mae_{name}"]) < 0.25 * std, (name, float(m[f"val/mae_{name}"]))
        assert abs(float(m[f"val/bias_{name}"])) < 0.1 * std
    # chance accuracy is 1/4-1/5 (most frequent class at most ~0.35)
    for task in TASKS:
        assert float(m[f"val/acc_{task}"]) > 0.65, task
    for key in ("train/loss", "val/loss", "val/loss_regression", "val/loss_stage", "val/nll_TEFF"):
        assert key in m and math.isfinite(float(m[key]))
    assert module.val_outputs["labels_pred"].shape == (256, 4)


def test_val_figures_logged_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained["tb_dir"]), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert "val/pred_vs_true" in tags and {f"val/confusion_{t}" for t in TASKS} <= set(tags)


def test_test_outputs_and_metrics_in_physical_units(trained, tmp_path):
    module = trained["module"]
    ds = SyntheticStars(200, seed=3)
    tr = trainer(tmp_path)
    tr.test(module, loader(ds))
    out, met = module.test_outputs, module.test_metrics
    assert out["labels_pred"].shape == out["sigma_total"].shape == (200, 4)
    assert out["class_probs"]["luminosity_class"].shape == (200, 5)
    assert np.array_equal(out["index"], np.arange(200))
    assert np.array_equal(out["label_mask"], ds.label_mask > 0)
    mean, std = np.array([4800.0, 2.5, -0.2, 0.1]), np.array([600.0, 1.0, 0.3, 0.1])
    present = ds.label_mask > 0
    np.testing.assert_allclose(out["labels_true"][present], (ds.z * std + mean)[present], rtol=1e-5)
    assert np.isnan(out["labels_true"][~present]).all()
    np.testing.assert_allclose(out["label_err"][present], (0.02 * np.broadcast_to(std, ds.z.shape))[present], rtol=1e-5)
    np.testing.assert_array_equal(out["class_true"]["stage"], ds.classes[:, 2])
    teff = met["labels"]["TEFF"]
    assert teff["n"] == int(present[:, 0].sum()) and teff["unit"] == "K"
    d = out["labels_pred"][present[:, 0], 0] - out["labels_true"][present[:, 0], 0]
    assert teff["mae"] == pytest.approx(float(np.abs(d).mean()), rel=1e-5)
    assert teff["bias"] == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-3)
    assert 0.0 <= teff["coverage_68"] <= 1.0 and teff["z_std"] > 0
    assert 0.65 < met["classes"]["spectral_type"]["accuracy"] <= 1.0
    assert "test/mae_TEFF" in tr.callback_metrics
    assert (out["sigma_epistemic"] == 0).all()
    module.mc_dropout_samples = 4  # MC dropout in test_step -> epistemic sigma
    try:
        trainer(tmp_path).test(module, loader(SyntheticStars(32, seed=4)))
    finally:
        module.mc_dropout_samples = 0
    out = module.test_outputs
    assert out["labels_pred"].shape == (32, 4) and (out["sigma_epistemic"] > 0).all()
    np.testing.assert_allclose(out["sigma_total"], np.hypot(out["sigma_aleatoric"], out["sigma_epistemic"]), rtol=1e-5)


def test_checkpoint_with_standard_callbacks_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    module = make_module(scheduler={"name": "cosine", "warmup_steps": 2})
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/loss", save_last=True,
                                           filename="best-{epoch}", auto_insert_metric_name=False)
    cbs = [ckpt_cb, pl.callbacks.EarlyStopping(monitor="val/loss", patience=3), pl.callbacks.LearningRateMonitor("step")]
    tr = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=cbs, enable_progress_bar=False,
                    enable_model_summary=False, logger=pl.loggers.CSVLogger(str(tmp_path)), log_every_n_steps=1)
    tr.fit(module, loader(SyntheticStars(64, seed=5), batch_size=16), loader(SyntheticStars(32, seed=6)))
    assert ckpt_cb.best_model_path
    pred = load_model(ckpt_cb.best_model_path)
    out = pred.predict(np.ones((2, P_SMALL), np.float32), np.full((2, P_SMALL), 0.01, np.float32))
    assert out["labels"].shape == (2, 4) and np.isfinite(out["labels"]).all()
    assert any(k.startswith("lr-AdamW") for k in tr.callback_metrics)  # LearningRateMonitor


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step called without a Trainer
def test_nan_guard_raise_and_skip(caplog):
    b = make_batch(4)
    b["labels"][1, 2] = float("nan")  # present label that is NaN
    m = make_module(nan_policy="raise")
    with pytest.raises(FloatingPointError, match=r"batch_idx=3.*regression"):
        m.training_step(b, 3)
    m = make_module(nan_policy="skip")
    with caplog.at_level(logging.WARNING, logger="stellarnet.network.module"):
        assert m.training_step(b, 5) is None
    assert "batch_idx=5" in caplog.text and m.n_skipped_batches == 1
    # a finite batch trains as usual
    assert torch.isfinite(m.training_step(make_batch(4), 0))


def test_nan_batch_is_skipped_inside_trainer(tmp_path):
    class WithNaN(SyntheticStars):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i < 16:  # the whole first batch
                item["flux"] = torch.full_like(item["flux"], float("nan"))
            return item

    torch.manual_seed(0)
    m = make_module(nan_policy="skip")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer(tmp_path, max_steps=1).fit(m, loader(WithNaN(64), batch_size=16))
    assert m.n_skipped_batches == 1
    after = m.state_dict()  # weights and batch-norm statistics untouched by the NaN batch
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer(tmp_path, max_steps=4).fit(m, loader(WithNaN(64), batch_size=16))
    assert m.n_skipped_batches == 2
    after = m.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["regression_head.mean.weight"], after["regression_head.mean.weight"])


# ----------------------------------------------------------------------------------------------
# checkpoints and inference
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_path(trained):
    path = trained["tmp"] / "model.ckpt"
    trained["trainer"].save_checkpoint(str(path))
    return path


def test_checkpoint_loads_weights_only_and_predicts_like_module(trained, ckpt_path, tmp_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert "hyper_parameters" in ckpt
    module = trained["module"].eval()
    ds = trained["val"]
    pred = load_model(ckpt_path).predict(ds.flux[:50], ds.err[:50], pix_mask=ds.pix_mask[:50], batch_size=16)
    with torch.inference_mode():
        ref = module.predict_batch(
            torch.from_numpy(ds.flux[:50]), torch.from_numpy(ds.err[:50]), torch.from_numpy(ds.pix_mask[:50]),
            torch.zeros(50, 6), torch.zeros(50, 6),
        )
    np.testing.assert_allclose(pred["labels"], ref["labels"].numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pred["sigma_aleatoric"], ref["sigma_aleatoric"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pred["class_probs"]["stage"], ref["class_probs"]["stage"].numpy(), atol=1e-5)
    assert (pred["sigma_epistemic"] == 0).all()
    np.testing.assert_allclose(pred["sigma_total"], pred["sigma_aleatoric"])
    assert set(pred["classes"]["stage"]) <= set(TASKS["stage"])
    np.testing.assert_array_equal(pred["classes"]["stage"], np.array(TASKS["stage"])[pred["class_probs"]["stage"].argmax(1)])
    # the model folder gives the same predictions
    folder = save_model_folder(module, tmp_path / "folder")
    assert (folder / "data_spec.json").is_file() and (folder / "config.yaml").is_file()
    pred2 = load_model(folder).predict(ds.flux[:50], ds.err[:50], pix_mask=ds.pix_mask[:50])
    np.testing.assert_allclose(pred2["labels"], pred["labels"], rtol=1e-5, atol=1e-5)
    p = load_model(folder)
    assert p.label_names == LABELS and p.data_spec["n_pixels"] == P_SMALL and p.grid is None


def test_fused_predictor_matches_unfused(trained):
    from stellarnet.network.inference import Predictor

    module = trained["module"]
    ds = trained["val"]
    fused, plain = Predictor(module, fuse=True), Predictor(module, fuse=False)
    assert plain.net is module and fused.net is not module
    assert not any(isinstance(mm, torch.nn.BatchNorm1d) for mm in fused.net.modules())
    a = fused.predict(ds.flux[:40], ds.err[:40], photometry=np.full((40, 6), 0.5))
    b = plain.predict(ds.flux[:40], ds.err[:40], photometry=np.full((40, 6), 0.5))
    for k in ("labels", "sigma_aleatoric"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(a["class_probs"]["stage"], b["class_probs"]["stage"], atol=1e-5)
    assert any(isinstance(mm, torch.nn.BatchNorm1d) for mm in module.modules())  # original untouched


def test_predict_standardizes_raw_photometry(trained, ckpt_path):
    module = trained["module"].eval()
    pred = load_model(ckpt_path)
    ds = trained["val"]
    spec = make_spec()
    raw = ds.phot[:20] * np.array(spec["phot_std"]) + np.array(spec["phot_mean"])
    raw[ds.phot_mask[:20] == 0] = np.nan
    out = pred.predict(ds.flux[:20], ds.err[:20], photometry=raw, pix_mask=ds.pix_mask[:20])
    with torch.inference_mode():
        ref = module.predict_batch(
            torch.from_numpy(ds.flux[:20]), torch.from_numpy(ds.err[:20]), torch.from_numpy(ds.pix_mask[:20]),
            torch.from_numpy(ds.phot[:20]), torch.from_numpy(ds.phot_mask[:20]),
        )
    np.testing.assert_allclose(out["labels"], ref["labels"].numpy(), rtol=1e-4, atol=1e-3)
    no_phot = pred.predict(ds.flux[:20], ds.err[:20], pix_mask=ds.pix_mask[:20])
    all_nan = pred.predict(ds.flux[:20], ds.err[:20], photometry=np.full((20, 6), np.nan), pix_mask=ds.pix_mask[:20])
    np.testing.assert_allclose(no_phot["labels"], all_nan["labels"])
    assert not np.allclose(no_phot["labels"], out["labels"])
    with pytest.raises(ValueError, match="photometry"):
        pred.predict(ds.flux[:20], ds.err[:20], photometry=np.zeros((20, 5)))


def test_mc_dropout_gives_nonzero_epistemic_sigma(ckpt_path, trained):
    pred = load_model(ckpt_path)
    ds = trained["val"]
    base = pred.predict(ds.flux[:30], ds.err[:30])
    mc = pred.predict(ds.flux[:30], ds.err[:30], mc_samples=8, seed=1)
    assert (mc["sigma_epistemic"] > 0).all()
    np.testing.assert_allclose(mc["labels"], base["labels"], rtol=1e-6)
    np.testing.assert_allclose(mc["sigma_total"], np.sqrt(mc["sigma_aleatoric"] ** 2 + mc["sigma_epistemic"] ** 2), rtol=1e-5)
    again = pred.predict(ds.flux[:30], ds.err[:30], mc_samples=8, seed=1)
    np.testing.assert_array_equal(mc["sigma_epistemic"], again["sigma_epistemic"])
    for net in (pred.module, pred.net):  # MC dropout restores eval mode everywhere
        assert not any(mm.training for mm in net.modules())


def test_nonfinite_pixels_are_masked_in_predict(ckpt_path, trained):
    pred = load_model(ckpt_path)
    ds = trained["val"]
    f, e = ds.flux[:5].copy(), ds.err[:5].copy()
    m = ds.pix_mask[:5].copy()
    m[:, 30:40] = 0
    ref = pred.predict(f, e, pix_mask=m)
    f[:, 30:35] = np.nan
    e[:, 35:40] = np.inf
    out = pred.predict(f, e, pix_mask=m)
    np.testing.assert_allclose(out["labels"], ref["labels"], rtol=1e-6)
    assert np.isfinite(out["labels"]).all()


def test_checkpoint_with_missing_key_is_rejected(ckpt_path, tmp_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    removed = "regression_head.mean.weight"
    del ckpt["state_dict"][removed]
    ckpt["state_dict"]["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "missing.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"missing keys.*regression_head\.mean\.weight.*extra\.weight"):
        load_model(bad)


class Payload:
    """An arbitrary class: unpickling it would run code we did not vet."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(ckpt_path, tmp_path, capsys):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {"evil": Payload()}
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(evil)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as fh:
        pickle.dump({"state_dict": {}, "hyper_parameters": Payload()}, fh)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(legacy)
    assert "this must never run" not in capsys.readouterr().out


def test_checkpoint_with_foreign_target_is_rejected(ckpt_path, tmp_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["net"]["trunk"] = {"_target_": "os.system", "command": "echo pwned"}
    bad = tmp_path / "target.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="not allowed"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "nowhere.ckpt")


def test_wrong_grid_length_raises_value_error_naming_both_grids(tmp_path):
    net = {**TINY_NET, "spectral_encoder": {**TINY_NET["spectral_encoder"], "strides": [8, 8]}}
    m = StellarNetModule(net=net, data_spec=make_spec(7214, "dr12"))
    folder = save_model_folder(m, tmp_path / "dr12")
    pred = load_model(folder)
    assert pred.grid == "dr12"
    x = np.ones((2, 7514), np.float32)
    with pytest.raises(ValueError, match=r"7514.*dr17.*dr12.*7214"):
        pred.predict(x, np.full_like(x, 0.01))
    ok = pred.predict(np.ones(7214, np.float32), np.full(7214, 0.01, np.float32))  # a single spectrum
    assert ok["labels"].shape == (1, 4)


def test_mc_dropout_is_skipped_for_a_dropout_free_model():
    """With every dropout p = 0 there is nothing to sample: σ_epistemic is 0 and no extra passes run."""
    import copy

    net = copy.deepcopy(TINY_NET)
    net["spectral_encoder"]["dropout"] = 0.0
    net["trunk"]["dropout"] = 0.0
    net["photometry"]["dropout"] = 0.0
    free = StellarNetModule(net=net, data_spec=make_spec(), log_figures=False).eval()
    assert not free.has_mc_dropout and make_module().has_mc_dropout
    b = make_batch(4)
    calls = []
    free._heads = (lambda orig: (lambda *a, **k: calls.append(1) or orig(*a, **k)))(free._heads)
    with torch.no_grad():
        out = free.predict_batch(b["flux"], b["flux_err"], b["pix_mask"], b["photometry"], b["phot_mask"], mc_samples=20)
    assert len(calls) == 1
    assert torch.equal(out["sigma_epistemic"], torch.zeros_like(out["sigma_epistemic"]))
    assert torch.allclose(out["sigma_total"], out["sigma_aleatoric"])
