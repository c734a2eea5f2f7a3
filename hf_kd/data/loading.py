"""Loading the user's dataset (Hub id, ``save_to_disk`` directory or data files) and shaping its splits."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

from hf_kd.tasks.causal_lm import check_prompt_columns

INPUT_FIELD = {
    "text-classification": "text_column",
    "image-classification": "image_column",
    "feature-classification": "feature_column",
}
"""The DataArguments field naming the model-input column of each classification task."""


def load_splits(data_args) -> DatasetDict:
    """The dataset named by ``data_args`` (a ``hf_kd.config.DataArguments``), as a DatasetDict."""
    name = data_args.dataset_name
    if name is None:
        raise ValueError(
            "dataset_name is required: a Hub dataset id, a save_to_disk directory or a builder (csv, json, ...)"
        )
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = load_from_disk(str(path))
        dataset = loaded if isinstance(loaded, DatasetDict) else DatasetDict({data_args.train_split: loaded})
    else:
        if name.startswith((".", "/", "~")) and not path.exists():
            raise FileNotFoundError(f"dataset_name={name!r}: no such directory")
        dataset = load_dataset(name, data_args.dataset_config, data_files=data_args.data_files)
    for split in (data_args.train_split, data_args.eval_split):
        if split is not None and split not in dataset:
            raise ValueError(f"split {split!r} is not in dataset {name!r}; it has {sorted(dataset)}")
    check_columns(dataset, data_args, [s for s in (data_args.train_split, data_args.eval_split) if s])
    return dataset


def dataset_inputs(data_args) -> dict[str, str]:
    """What ``data_args`` reads from disk, as field name → path (Hub ids included; see
    ``hf_kd.paths.local_input``): the dataset and each of its data files."""
    inputs = {} if data_args.dataset_name is None else {"dataset_name": data_args.dataset_name}
    files = data_args.data_files
    named = files.items() if isinstance(files, dict) else [(None, files)]
    for split, paths in named:
        for i, path in enumerate([paths] if isinstance(paths, str) else paths or []):
            inputs["data_files" + (f"[{split!r}]" if split is not None else "") + f"[{i}]"] = path
    return inputs


def column_groups(data_args) -> list[dict[str, str]]:
    """The columns the task of ``data_args`` reads, in groups of field name → column: a split must hold
    one column of each group (causal-lm reads conversations or plain text)."""
    if data_args.task == "causal-lm" and data_args.prompt_column:
        return [{"prompt_column": data_args.prompt_column}]
    if data_args.task == "causal-lm":
        return [{"messages_column": data_args.messages_column, "text_column": data_args.text_column}]
    field_name = INPUT_FIELD[data_args.task]
    groups = [{field_name: getattr(data_args, field_name)}]
    if data_args.task == "text-classification" and data_args.text_pair_column:
        groups.append({"text_pair_column": data_args.text_pair_column})
    return groups + [{"label_column": data_args.label_column}]


def _check_named_alternatives(group: dict[str, str], columns: list[str], data_args, split: str) -> None:
    """Of a group of alternative columns (causal-lm: ``messages_column`` or ``text_column``), one the user
    named away from its default must be there: the task would otherwise read the other one silently."""
    if len(group) < 2:
        return
    defaults = {f.name: f.default for f in fields(data_args)}
    for field_name, column in group.items():
        if column != defaults.get(field_name) and column not in columns:
            others = [f"{other!r} ({name})" for name, other in group.items() if name != field_name]
            raise ValueError(
                f"{field_name}={column!r}: split {split!r} of dataset {data_args.dataset_name!r} has no such "
                f"column (its columns: {columns}); it would be read from {' or '.join(others)} instead. "
                f"Name a column it has"
            )


def check_columns(dataset: DatasetDict, data_args, splits: list[str]) -> None:
    """Fail before any model loads when a split lacks a column the task reads, naming the field, the
    column and the split's columns."""
    for split in splits:
        columns = dataset[split].column_names
        for group in column_groups(data_args):
            if any(column in columns for column in group.values()):
                _check_named_alternatives(group, columns, data_args, split)
                continue
            named = " nor ".join(f"{column!r} ({field_name})" for field_name, column in group.items())
            raise ValueError(
                f"split {split!r} of dataset {data_args.dataset_name!r} has "
                f"{'neither column' if len(group) > 1 else 'no column'} {named}, which task={data_args.task!r} "
                f"reads; its columns: {columns}"
            )
        if data_args.task == "causal-lm" and data_args.prompt_column:
            check_prompt_columns(
                dataset[split].features,
                data_args.prompt_column,
                data_args.completion_column,
                where=f"split {split!r} of dataset {data_args.dataset_name!r}",
            )
