"""Training throughput on CPU: optimizer steps of the default model on the shard dataset.

Usage:
    python scripts/bench_train.py [--dataset-dir data] [--batches 60] [--warmup 10]
        [--configs bf16-mixed:1,32-true:1,bf16-mixed:0,32-true:0] [--out outputs/bench/train.json]

Each configuration ``precision:num_workers`` runs in a fresh child process: the Hydra config
``train.yaml`` + ``+experiment=apogee`` is composed (batch size 128, the default model), the
DataModule and model are instantiated exactly as ``stellarnet.workflows.train.train`` does, and torch
threads are set by ``stellarnet.common.hardware.configure_cpu_threads`` (the CPUs left after the
data-loader workers). A Lightning ``Trainer`` then fits one epoch limited to ``--batches``
training batches, without validation, logging or checkpoints. The rate (samples/s) counts the
batches after the first ``--warmup`` ones (oneDNN primitive creation, worker start-up), timed by
a callback from the start of batch ``warmup`` to the end of the last batch, so it includes data
loading as seen by the training loop. Peak RSS: the child's VmHWM (its loader workers are
separate processes and not included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    ROOT,
    ForeignCPU,
    busy_warning,
    finish,
    machine_info,
    run_child_measured,
)

_CHILD = r"""
import json, sys, time, tempfile, os
a = json.loads(sys.argv[1])
import hydra, lightning as L, torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from stellarnet.common.paths import CONF_DIR
from stellarnet.common.hardware import configure_cpu_threads, resolve_cpu_precision
from stellarnet.dataset.ensure import ensure_shards
with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
    cfg = compose(config_name="train", overrides=["+experiment=apogee", f"paths.data_dir={a['data_dir']}",
                                                   f"data.datamodule.num_workers={a['workers']}", *a["overrides"]])
with open_dict(cfg):
    cfg.paths.output_dir = tempfile.mkdtemp(prefix="bench_train_")
L.seed_everything(0)
ensure_shards(OmegaConf.to_container(cfg.data, resolve=True))  # a no-op when the shards are current
threads = configure_cpu_threads(a["workers"], cfg.get("cpu_threads", "auto"))
precision = resolve_cpu_precision(a["precision"])
dm = hydra.utils.instantiate(cfg.data.datamodule)
model = hydra.utils.instantiate(cfg.model, data_spec=dm.data_spec(), _convert_="all")
model.log_figures = False

class Timer(L.Callback):
    def __init__(self, warmup):
        self.warmup, self.t0, self.t1, self.n, self.samples = warmup, None, None, 0, 0
        self.first = None
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = time.perf_counter()
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.n += 1
            self.samples += int(batch["flux"].shape[0])
            self.t1 = time.perf_counter()

timer = Timer(a["warmup"])
trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=1,
                    limit_train_batches=a["batches"], limit_val_batches=0, num_sanity_val_steps=0,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, gradient_clip_val=cfg.trainer.gradient_clip_val,
                    callbacks=[timer], default_root_dir=cfg.paths.output_dir)
t = time.perf_counter()
trainer.fit(model, datamodule=dm)
total = time.perf_counter() - t
dt = timer.t1 - timer.t0
import shutil
shutil.rmtree(cfg.paths.output_dir, ignore_errors=True)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
print(json.dumps({"precision_requested": a["precision"], "precision": precision, "num_workers": a["workers"],
                  "torch_threads": threads, "batch_size": int(cfg.data.datamodule.batch_size),
                  "timed_batches": timer.n, "samples_per_s": timer.samples / dt, "batches_per_s": timer.n / dt,
                  "fit_total_s": total, "startup_to_first_batch_s": timer.first - t,
                  "train_samples_in_dataset": len(dm.datasets["train"]), "peak_rss_mb": hwm()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", default=str(ROOT / "data"), help="paths.data_dir holding shards/sim_dr12")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--configs", default="bf16-mixed:1,32-true:1,bf16-mixed:0,32-true:0",
                    help="comma list of precision:num_workers")
    ap.add_argument("--overrides", default="", help="extra Hydra overrides, comma separated")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/train.json"))
    args = ap.parse_args()
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "batches": args.batches,
                 "warmup_batches": args.warmup, "runs": []}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    for item in args.configs.split(","):
        prec, workers = item.split(":")
        child = {"data_dir": args.dataset_dir, "workers": int(workers), "precision": prec, "batches": args.batches,
                 "warmup": args.warmup, "overrides": [o for o in args.overrides.split(",") if o]}
        r = run_child_measured(["-c", _CHILD, json.dumps(child)])
        print(json.dumps(r), flush=True)
        res["runs"].append(r)
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
