"""The real GPU paths: NVML energy of the GPU in use, and the Lightning callback on CUDA.

Skipped where there is no CUDA GPU (as in CI); run on a GPU machine, where the tests on
``FakeNVML`` in ``tests/test_power.py`` stand in for nothing.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def busy(seconds: float) -> None:
    """Keep the GPU doing bf16 matrix products for about ``seconds``."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def test_nvml_measures_the_energy_of_the_gpu_this_process_uses():
    pytest.importorskip("pynvml")
    from lossforecast.integrations.flops import cuda_device_ids

    from lossforecast._power import open_energy_monitor

    device = torch.device("cuda", torch.cuda.current_device())
    monitor = open_energy_monitor(cuda_device_ids(device), interval=0.05)
    assert monitor is not None
    assert [d.startswith("GPU ") for d in monitor.devices] == [True]  # this GPU, no RAPL
    busy(1.5)
    watts = monitor.watts()
    monitor.close()
    total = monitor.total()
    assert total.n_samples > 10
    assert 30.0 < total.watts < 2_000.0  # an H100 draws 70-700 W
    assert 30.0 < watts < 2_000.0
    assert total.joules == pytest.approx(total.watts * total.seconds, rel=1e-6)
    assert total.n_resets == 0


def test_a_sampled_probe_step_synchronises_the_gpu_once():
    from lossforecast.integrations.torch import Probes

    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    model = torch.nn.Sequential(layer, torch.nn.Linear(64, 50)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16, 64, device="cuda")
    with Probes(model, opt, every_n_steps=1) as probes:
        for step in range(3):  # Adam's state exists from the second step on
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with pytest.warns(UserWarning) as seen:
                    model(x).logsumexp(-1).mean().backward()
                    probes.before_optimizer_step(step)
                    opt.step()
                    opt.zero_grad()
                    metrics = probes.after_optimizer_step(step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert {"attn_logit_max", "output_logsumexp", "grad_norm", "update_ratio"} <= set(metrics)
    assert "adam_v_rms_over_eps" in metrics


def test_lightning_callback_on_cuda_reports_power_mfu_and_energy_to_finish(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lossforecast.integrations.lightning import LossForecastCallback

    steps = 1500  # a few seconds: the energy sampler (every 1 s) needs two samples

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1)
            )

        def forward(self, batch):  # the callback counts the FLOPs of module(batch)
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self(batch)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cos, "interval": "step"}}

        def train_dataloader(self):
            x = torch.randn(64 * 512, 1024)
            data = torch.utils.data.TensorDataset(x, x[:, :1] * 0.5)
            return torch.utils.data.DataLoader(data, batch_size=512, shuffle=True)

    cb = LossForecastCallback(every_n_steps=10)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        callbacks=[cb],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net())
    status = cb.status()
    assert status is not None and status.forecast is not None
    cost = status.cost
    assert 30.0 < cost.get("compute/watts", 0) < 2_000.0, cost  # NVML, through the callback
    assert cost.get("compute/joules", 0) > 0, cost
    assert 0.0 < cost.get("compute/mfu", 0) < 1.0, cost  # FLOPs counted, H100 peak known
    summary = [e for e in cb.events if e.is_summary]
    assert summary and summary[-1].data.get("compute/joules", 0) > 0, summary[-1].data
