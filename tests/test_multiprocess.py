"""Two processes on CPU (gloo) against one: the same distillation, the same teacher placement.

Run as a script under torchrun, this file is also the worker of the FSDP2 test
(``torchrun --nproc_per_node 2 tests/test_multiprocess.py OUT_DIR``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from processes import launch, python, torchrun
from safetensors.torch import load_file

TOLERANCE = {"rel": 1e-5, "abs": 1e-6}
"""2 ranks vs 1 process: same batches and normalisers, gradients summed in a different order (float32)."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run, once in one process (batch 16) and once over two ranks (2 × 8), saving at step 4."""
    from distill_run import write_tiny_run

    root = tmp_path_factory.mktemp("mp")
    recipe = write_tiny_run(root, save_strategy="steps", save_steps=4)
    script = ["scripts/distill.py", "--config", str(recipe)]
    launch([*python(), *script, "--output_dir", str(root / "one")])
    two = launch(
        [
            *torchrun(),
            *script,
            "--output_dir",
            str(root / "two"),
            "--per_device_train_batch_size",
            "8",
            "--per_device_eval_batch_size",
            "8",
        ]
    )
    return root, two


def test_two_processes_end_where_one_process_ends(runs):
    """Same final weights and evaluation. The evaluation of 2 ranks covers all 32 rows (gathered), and
    eval_loss_hard/eval_loss_soft are reduced over ranks: rank 0's 16 rows alone would score differently."""
    root, _ = runs
    one = json.loads((root / "one" / "eval_results.json").read_text())
    two = json.loads((root / "two" / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_loss_hard", "eval_loss_soft", "eval_accuracy"):
        assert two[key] == pytest.approx(one[key], **TOLERANCE), key
    weights_one = load_file(root / "one" / "model.safetensors")
    weights_two = load_file(root / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        # The attention key bias has a zero true gradient (softmax ignores a shift shared by all keys):
        # Adam turns its float-rounding gradient into steps of ~1e-5, differently summed on 2 ranks.
        atol = 1e-4 if name.endswith("key.bias") else 1e-6
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-5, atol=atol, msg=name)


def test_only_the_main_process_writes(runs):
    root, two = runs
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    # Every file of the 1-process run, written once; each rank adds only its own RNG state.
    one = [name.replace("rng_state.pth", "rng_state_0.pth") for name in listing(root / "one")]
    assert listing(root / "two") == sorted([*one, "checkpoint-4/rng_state_1.pth"])
    assert not [p for p in (root / "two").rglob(".*")], "temporary files left behind"
    table_rows = [line for line in two.stdout.splitlines() if line.startswith("eval_accuracy ")]
    assert len(table_rows) == 1, "the metrics table is printed by rank 0 only"


def test_teacher_is_not_in_checkpoint_or_student(runs):
    root, _ = runs
    from transformers import ViTForImageClassification

    student = ViTForImageClassification.from_pretrained(root / "two")
    student_size = sum(p.numel() for p in student.parameters())
    for folder in (root / "two", root / "two" / "checkpoint-4"):
        saved = load_file(folder / "model.safetensors")  # names as saved (transformers renames on load)
        assert len(saved) == len(student.state_dict())
        assert sum(t.numel() for t in saved.values()) == student_size
    teacher_size = sum(t.numel() for t in load_file(root / "teacher" / "model.safetensors").values())
    assert teacher_size > student_size
    card = (root / "two" / "README.md").read_text()
    assert "**Divergence D:** `forward_kl`" in (root / "two" / "checkpoint-4" / "README.md").read_text()
    assert "base_model" not in card  # a local teacher path is not a Hub id
    assert f"`{root / 'teacher'}`" in card


def test_fsdp2_teacher_is_sharded_and_exact(tmp_path):
    """FSDP2's fully_shard on CPU/gloo, the sharding hf_kd applies to the teacher under an FSDP config."""
    launch([*torchrun(), "tests/test_multiprocess.py", str(tmp_path)])
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["max_abs_diff_logits"] == 0.0
        assert report["max_abs_diff_head"] == 0.0
        assert report["trainable"] == 0
        # parameters split in two; buffers (position ids) stay whole on each rank
        assert report["sharded_bytes"] == pytest.approx(report["full_bytes"] / 2, rel=0.02)


def _fsdp_worker(out_dir: Path) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import vit_classifier

    from hf_kd.modeling import freeze, logit_layer_weight
    from hf_kd.teachers.placement import full_teacher, shard_teacher, teacher_bytes_per_process

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher = freeze(vit_classifier(hidden=64, layers=2, seed=1))
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        reference = teacher(pixel_values=pixels).logits
    head, full_bytes = logit_layer_weight(teacher).clone(), teacher_bytes_per_process(teacher)
    shard_teacher(teacher)
    with torch.no_grad():
        logits = teacher(pixel_values=pixels).logits
    with full_teacher(teacher) as whole:
        head_diff = (logit_layer_weight(whole) - head).abs().max().item()
    report = {
        "max_abs_diff_logits": (logits - reference).abs().max().item(),
        "max_abs_diff_head": head_diff,
        "trainable": sum(p.requires_grad for p in teacher.parameters()),
        "full_bytes": full_bytes,
        "sharded_bytes": teacher_bytes_per_process(teacher),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(Path(sys.argv[1]))
