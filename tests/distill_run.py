"""A tiny on-disk distillation run for the multi-process, resume and Hub tests: a digits-like image
dataset (``save_to_disk``), its processor, a saved ViT teacher and a recipe, all built offline."""

from __future__ import annotations

from pathlib import Path

import yaml
from datasets import DatasetDict
from tiny import image_dataset, image_processor, save_model, vit_classifier

STUDENT_CONFIG = {
    "model_type": "vit",
    "image_size": 8,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def write_tiny_run(root: Path, **recipe_overrides) -> Path:
    """Write data, processor, teacher and ``recipe.yaml`` under ``root``; return the recipe path.

    64 training rows, 32 evaluation rows, 3 classes; 4 steps of global batch 16."""
    DatasetDict(train=image_dataset(64, seed=0), test=image_dataset(32, seed=1)).save_to_disk(
        str(root / "data")
    )
    image_processor().save_pretrained(root / "processor")
    save_model(vit_classifier(hidden=32, layers=2, seed=1), image_processor(), root / "teacher")
    recipe = {
        "task": "image-classification",
        "dataset_name": str(root / "data"),
        "student_config": STUDENT_CONFIG,
        "student_processor": str(root / "processor"),
        "teacher_model_name_or_path": str(root / "teacher"),
        "alpha": 0.5,
        "temperature": 2.0,
        "max_steps": 4,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1.0e-2,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 2,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "output_dir": str(root / "out"),
    }
    recipe.update(recipe_overrides)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cache_tiny_teacher(root: Path, recipe: Path, **cache_fields) -> Path:
    """Capture the teacher of :func:`write_tiny_run`'s ``recipe`` over its data with
    ``scripts/cache_teacher.py`` (``cache_fields``: ``top_k``, ``logits_dtype``, ...) into ``root/cache``;
    return the cache's path."""
    from scripts import cache_teacher

    base = yaml.safe_load(recipe.read_text())
    cache_recipe = root / "cache.yaml"
    cache_recipe.write_text(
        yaml.safe_dump(
            {
                "task": "image-classification",
                "dataset_name": base["dataset_name"],
                "train_split": "train",
                "eval_split": "test",
                "teacher_model_name_or_path": base["teacher_model_name_or_path"],
                "output_dir": str(root / "cache"),
                "use_cpu": True,
                **cache_fields,
            }
        )
    )
    cache_teacher.main(["--config", str(cache_recipe)])
    return root / "cache"
