"""CUDA paths: bf16 online KD on one GPU; DDP, FSDP2 and ZeRO-3 launches on two. Skipped without GPUs
(this suite must pass on CPU-only CI); run them on a GPU machine with ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from distill_run import write_tiny_run
from processes import BIN, ROOT, free_port, launch

GPUS = torch.cuda.device_count()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")


def gpu_recipe(tmp_path: Path) -> Path:
    return write_tiny_run(
        tmp_path, use_cpu=False, bf16=True, teacher_model_init_kwargs={"dtype": "bfloat16"}, max_steps=6
    )


def test_bf16_online_kd_on_one_gpu(tmp_path):
    """The teacher loads in bf16 on the GPU, the student trains under bf16 autocast, the loss is finite."""
    from hf_kd import parse_args, run_distillation

    result = run_distillation(
        *parse_args(["--config", str(gpu_recipe(tmp_path)), "--output_dir", str(tmp_path / "out")])
    )
    teacher = result.trainer.teacher_model
    assert next(teacher.parameters()).dtype == torch.bfloat16 and next(teacher.parameters()).is_cuda
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    # The agreement is the share of the 32 evaluation rows where student and teacher pick the same class.
    output = result.trainer.predict(result.trainer.eval_dataset)
    student_logits, teacher_logits = output.predictions
    same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).mean()
    assert len(student_logits) == 32 and output.metrics["test_agreement"] == pytest.approx(same)
    assert result.metrics["eval_agreement"] == pytest.approx(same)


def test_compressed_codecs_encode_a_cuda_teachers_logits():
    """A compressed capture from a teacher on the GPU: the top-k runs there, the rows are packed on the
    CPU, and every decoded log-prob is within the codec's bound of the exact one."""
    from hf_kd.teachers.codec import GolombTopkCodec, TopkCodec

    logits = 3 * torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    exact = torch.log_softmax(logits, -1)
    for codec in (TopkCodec(16, 0.95), GolombTopkCodec(16, 0.95)):
        rows, kept = codec.encode(logits.cuda(), [40, 24])
        decoded = codec.decode(rows, [40, 24], 512)
        stored = decoded.log_probs > -float("inf")
        error = (decoded.log_probs - exact.gather(-1, decoded.indices))[stored].abs().max()
        assert stored.sum() >= 64 and error <= codec.error_bound() and kept.shape == (64,)


@two_gpus
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml", "zero3.yaml"])
def test_two_gpu_launch(tmp_path, config):
    if config == "zero3.yaml" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    recipe = gpu_recipe(tmp_path)
    launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(ROOT / "recipes/accelerate_configs" / config),
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "scripts/distill.py",
            "--config",
            str(recipe),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        timeout=600,
    )
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    # Both processes' rows evaluated once: the accuracy is a whole number of the 32 evaluation rows.
    correct = metrics["eval_accuracy"] * 32
    assert correct == round(correct) and metrics["eval_loss_soft"] > 0
