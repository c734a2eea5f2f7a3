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


# ---- the loss through the output layers at a real vocabulary, bf16 ------------------------------------


def head_inputs(rows: int, vocab: int, hidden: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    scale = hidden**-0.5 * 2
    tensors = [torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * scale]
    tensors += [torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * scale]
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.1] = -100
    return [t.to("cuda", dtype) for t in tensors], labels.cuda()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "mse"])
def test_bf16_heads_at_a_real_vocabulary_match_the_float64_formula(name):
    """1,024 positions, vocabulary 128,256, hidden 1,024, bf16 student and teacher given as hidden states
    and output layers (default chunk for the GPU): loss and both gradients within bf16 rounding of the
    dense formula in float64 on the same values."""
    from formulas import divergence_by_hand

    from hf_kd.losses import HiddenStates, distillation_loss

    (h, w, th, tw), labels = head_inputs(1024, 128_256, 1024, torch.bfloat16)
    h.requires_grad_(True), w.requires_grad_(True)
    settings = dict(alpha=0.5, temperature=2.0, divergence_name=name, beta=0.3, skew=0.2)
    terms = distillation_loss(HiddenStates(h, w), HiddenStates(th, tw), labels, **settings)
    terms.loss.backward()
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    z, v = h64 @ w64.T, th.double() @ tw.double().T
    kept = labels != -100
    ce = -torch.log_softmax(z, -1)[kept].gather(-1, labels[kept, None]).mean()
    d = divergence_by_hand(name, z, v, 2.0, beta=0.3, skew=0.2)[kept].mean()
    want = 0.5 * ce + 0.5 * 4.0 * d
    want.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(terms.loss.double(), want.detach(), rtol=1e-2, atol=1e-3)
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_autocast_keeps_float32_weight_gradients_and_less_memory_than_the_dense_loss():
    """float32 master weights under bf16 autocast: the output layer's gradient accumulates in float32 (one
    product per chunk, bf16 operands); the fused pass with the teacher's output layer peaks below a
    quarter of the dense loss's memory at 8,192 positions × 128,256."""
    from hf_kd.losses import HiddenStates, distillation_loss

    (h, w, th, tw), labels = head_inputs(8192, 128_256, 1024, torch.float32)
    th, tw = th.bfloat16(), tw.bfloat16()
    h.requires_grad_(True), w.requires_grad_(True)
    peaks, grads = [], []
    for fused in (False, True):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            student = HiddenStates(h, w) if fused else h @ w.T
            teacher = HiddenStates(th, tw) if fused else th @ tw.T
            loss = distillation_loss(
                student, teacher, labels, alpha=0.5, temperature=2.0, divergence_name="jsd"
            )
        loss.loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        grads.append((loss.loss.detach(), h.grad.clone(), w.grad.clone()))
    assert grads[1][2].dtype == torch.float32
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-3, atol=1e-4)
    for got, ref in zip(grads[1][1:], grads[0][1:], strict=True):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    assert peaks[1] < peaks[0] / 4, peaks
