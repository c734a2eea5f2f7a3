"""The label column of a split: class names, hiding labels, and finding or dropping unlabelled rows
(label None or negative). Pure ``datasets`` row operations: nothing here loads a dataset."""

from __future__ import annotations

from datasets import ClassLabel, Dataset, Value


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


def count_unlabeled(dataset: Dataset, label_column: str) -> int:
    """Rows whose label is missing (None or negative); 0 when the column holds no scalar labels."""
    feature = dataset.features.get(label_column)
    integers = isinstance(feature, ClassLabel) or (
        isinstance(feature, Value) and feature.dtype.startswith("int")
    )
    if not integers:
        return 0
    stored = dataset.with_format(None)[label_column]  # the stored values, not an on-the-fly transform's
    return sum(v is None or v < 0 for v in stored)


def drop_unlabeled(dataset: Dataset, label_column: str) -> Dataset:
    """Only the rows with a label (not None, not negative)."""
    return dataset.filter(
        lambda labels: [v is not None and v >= 0 for v in labels],
        input_columns=label_column,
        batched=True,
        desc="Dropping unlabelled rows",
    )
