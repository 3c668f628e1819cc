"""A real 2-process Hugging Face Trainer run (gloo, CPU, launched by torchrun).

The main process forecasts; every process measures its own "energy" from a fake RAPL counter
(10 W and 20 W) and the main process must report their sum. A stop decided by the main
process (``auto_stop``, an Optuna prune) must stop both processes at the same step.

Run by pytest, this file starts itself under ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers, also in the ranks
from _ddp import (
    WATTS,
    assert_stopped_together,
    fit_back_to_back,
    free_port,
    measure_with_fake_rapl,
    run_two_ranks,
)

STEPS = 40
LOG_EVERY = 2
VOCAB = 16


def _train(out: Path, mode: str) -> None:
    import time

    import torch
    import transformers
    from lossforecast.integrations.transformers import LossForecastCallback

    rank = int(os.environ["LOCAL_RANK"])
    measure_with_fake_rapl(out, rank)

    class SlowSteps(transformers.TrainerCallback):  # ~1.5 s of training: the sampler needs it
        def on_step_end(self, *args, **kwargs):
            time.sleep(0.075)

    options = {}
    if mode != "forecast":
        fit_back_to_back()
    if mode == "stop":  # an unreachable target: auto_stop saves a checkpoint and stops
        options = {"target_loss": 1e-3, "auto_stop": True}
    elif mode == "prune":  # every process holds a trial; the main process's pruner decides
        import optuna
        from lossforecast.integrations.optuna import ForecastPruner

        study = optuna.create_study(pruner=ForecastPruner(min_progress=0.2))
        study.add_trial(optuna.trial.create_trial(value=1e-3))
        options = {"trial": study.ask()}
    cb = LossForecastCallback(**options)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, VOCAB, (STEPS * 8, 1), generator=g) + torch.arange(16)) % VOCAB
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=4,
        lr_scheduler_type="cosine",
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in ids],
        callbacks=[cb, SlowSteps()],
    )
    trainer.train()
    status = cb.status()
    result = {
        "forecasts": cb.forecaster is not None,
        "compute": None if status is None else status.cost,
        "global_step": trainer.state.global_step,
        "pruned": cb.pruned,
        "stop_reason": None if status is None else status.stop_reason,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # The Trainer leaves the process group to its script (Lightning destroys its own at
    # exit); left to interpreter shutdown, gloo's threads can abort the process
    # (pytorch/pytorch#190489).
    torch.distributed.destroy_process_group()


def _run(out: Path, mode: str) -> tuple[dict, dict]:
    """Train on 2 gloo processes under torchrun; the two processes' results."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launch += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    command = [*launch, __file__, str(out), mode]
    return run_two_ranks(command, out, {"OMP_NUM_THREADS": "1"})


def test_main_process_forecasts_and_reports_the_energy_of_both_processes(tmp_path):
    main, other = _run(tmp_path, "forecast")
    assert main["forecasts"] and not other["forecasts"]
    assert main["global_step"] == other["global_step"] == STEPS
    assert other["compute"] is None
    # the sum of both processes' counters, not the main process's times two
    assert main["compute"]["compute/watts"] == pytest.approx(sum(WATTS), rel=0.25)


@pytest.mark.parametrize("mode", ["stop", "prune"])
def test_processes_stop_together_when_the_main_process_decides(tmp_path, mode):
    if mode == "prune":
        pytest.importorskip("optuna")
    main, other = _run(tmp_path, mode)
    assert_stopped_together(main, other, mode, STEPS)
    if mode == "stop":
        (checkpoint,) = tmp_path.glob("checkpoint-*")
        assert checkpoint.name == f"checkpoint-{main['global_step']}"


if __name__ == "__main__":
    _train(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "forecast")
