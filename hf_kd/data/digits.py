"""The embedded default data set: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes),
written as a ``datasets`` image dataset with a matching image processor, fully offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from transformers import ViTImageProcessorPil

from hf_kd.files import write_atomic_dir

TEST_FRACTION = 0.3


def digits_dataset(seed: int = 0) -> DatasetDict:
    """train (1,257 rows) / test (540 rows) splits with an ``image`` (PIL, 8×8) and a ``label`` column."""
    digits = load_digits()
    images = [PILImage.fromarray((img * (255 / 16)).astype(np.uint8), mode="L") for img in digits.images]
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(TEST_FRACTION * len(images)))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def subset(indices) -> Dataset:
        return Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [int(digits.target[i]) for i in indices]},
            features=features,
        )

    return DatasetDict(train=subset(order[n_test:]), test=subset(order[:n_test]))


def digits_processor() -> ViTImageProcessorPil:
    """8×8 RGB, scaled to [−1, 1]."""
    return ViTImageProcessorPil(
        do_resize=True, size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def write_digits(path: str | Path, seed: int = 0) -> Path:
    """Write the dataset (``save_to_disk``) and its processor (``path/processor``) once; atomic."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file() and (path / "processor").is_dir():
        return path

    def write(folder: Path) -> None:
        digits_dataset(seed).save_to_disk(str(folder))
        digits_processor().save_pretrained(str(folder / "processor"))

    return write_atomic_dir(path, write)
