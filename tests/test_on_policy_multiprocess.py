"""On-policy distillation over two processes (CPU, gloo) against one, on the same prompts and seed.

What is equal, and what is not:

- The ``lmbda`` coin (who writes a micro-batch) is drawn from (seed, step, micro-batch index) only, so
  every process and the 1-process run make the same choice at every step.
- Sampling is seeded per (seed, step, micro-batch index, process): each rank draws from its own stream,
  so under real sampling (``top_k: 0``, temperature > 0) rank 1's 8 rows are not sampled with the
  numbers that the 1-process run used for rows 8-15. Sampled completions, hence weights, differ between
  1 × 16 and 2 × 8; only their distribution is the same.
- With a deterministic sampler (``top_k: 1``: the most likely token, whatever the seed) the completions
  depend on the prompts and the weights only, so 2 × 8 must end on the 1 × 16 weights, with the same
  logged losses at every step, within the tolerance of the off-policy test (gradients summed in another
  order).
"""

from __future__ import annotations

import json

import pytest
import torch
from processes import launch, python, torchrun
from safetensors.torch import load_file
from test_multiprocess import TOLERANCE
from test_on_policy import tiny_llama
from transformers import AutoTokenizer

from hf_kd.data.toy_chat import write_toy_chat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def on_policy_runs(tmp_path_factory):
    """The tiny on-policy recipe (lmbda 0.5, greedy completions), 4 steps, once in one process (batch 16)
    and once over two ranks (2 × 8). The student is the recipe's architecture with its EOS output row
    scaled × 3, so that its greedy completions stop at varied lengths (a fresh one writes max_new_tokens
    tokens every time, and every rank's mean completion length would be the same)."""
    root = tmp_path_factory.mktemp("on_policy_mp")
    data = write_toy_chat(root / "toy_chat", num_train=32, num_test=8)
    tiny_llama(48, seed=1).save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(str(data / "tokenizer")).save_pretrained(root / "teacher")
    student = tiny_llama(40, seed=0)
    with torch.no_grad():
        student.lm_head.weight[student.config.eos_token_id] *= 3
    student.save_pretrained(root / "student")
    script = ["scripts/distill.py", "--config", "recipes/causal_lm/tiny/on_policy.yaml"]
    script += ["--student_model_name_or_path", str(root / "student")]
    script += ["--dataset_name", str(data), "--student_processor", str(data / "tokenizer")]
    script += ["--teacher_model_name_or_path", str(root / "teacher"), "--top_k", "1"]
    script += ["--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size"]
    launch([*python(), *script, "16", "--output_dir", str(root / "one")])
    launch([*torchrun(), *script, "8", "--output_dir", str(root / "two")])
    return root


def _train_logs(folder) -> list[dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def test_two_processes_generate_and_train_as_one(on_policy_runs):
    """Same coin at every step (student samples and data steps both occur), same greedy completions and
    losses on them at every step, same final student weights; ``completion_length`` is the mean over both
    ranks' completions, so it equals the 1-process run's (rank 0's own mean would not)."""
    root = on_policy_runs
    one, two = _train_logs(root / "one"), _train_logs(root / "two")
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one] == [1, 2, 3, 4]
    kinds = {("loss_soft_generated" in entry) for entry in one}
    assert kinds == {True, False}, "lmbda 0.5 should mix sampled and data steps within 4 steps"
    for first, second in zip(one, two, strict=True):
        assert ("loss_soft_generated" in second) == ("loss_soft_generated" in first), first["step"]
        keys = [
            key
            for key in ("loss", "loss_soft_generated", "loss_soft_data", "completion_length")
            if key in first
        ]
        for key in keys:
            assert second[key] == pytest.approx(first[key], **TOLERANCE), (key, first["step"])
    weights_one = load_file(root / "one" / "model.safetensors")
    weights_two = load_file(root / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
