"""Loading the user's dataset (Hub id, ``save_to_disk`` directory or data files) and shaping its splits."""

from __future__ import annotations

from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk


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
    return dataset


def label_names(dataset: Dataset, label_column: str) -> list[str]:
    """Class names from a ``ClassLabel`` column, or the sorted distinct labels as strings."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if feature is None:
        raise ValueError(
            f"label_column={label_column!r} is not a column of the dataset; columns: {dataset.column_names}"
        )
    values = sorted({v for v in dataset[label_column] if v is not None and v >= 0})
    if values != list(range(len(values))):
        raise ValueError(
            f"labels of {label_column!r} must be ClassLabel or integers 0..K-1; found {values[:10]}"
        )
    return [str(v) for v in values]


def hide_labels(dataset: Dataset, label_column: str, num_labeled: int, seed: int) -> Dataset:
    """Keep the labels of ``num_labeled`` rows picked with ``seed``; the others get −1 (unlabelled)."""
    if num_labeled > len(dataset):
        raise ValueError(f"num_labeled_examples={num_labeled} exceeds the {len(dataset)} training rows")
    keep = set(Dataset.from_dict({"i": list(range(len(dataset)))}).shuffle(seed=seed)["i"][:num_labeled])
    features = dataset.features.copy()
    return dataset.map(
        lambda row, i: {label_column: row[label_column] if i in keep else -1},
        with_indices=True,
        features=features,
        desc="Hiding labels",
    )


def drop_unlabeled(dataset: Dataset, label_column: str) -> Dataset:
    """Only the rows with a label (not None, not negative)."""
    return dataset.filter(
        lambda labels: [v is not None and v >= 0 for v in labels],
        input_columns=label_column,
        batched=True,
        desc="Dropping unlabelled rows",
    )
