"""A synthetic classification task with a known class hierarchy, in the spirit of Tang et al. (2020).

Classes come in groups: the centre of class c is its group centre plus a smaller class offset,

    μ_c = G · g_{group(c)} + C · o_c,      g, o ~ N(0, I_dim),  G = GROUP_SCALE > C = CLASS_SCALE,

so templates of one group are related (level 2 has something to find). Each instance of class c has
a ground-truth difficulty d ~ U(0, ``difficulty``) and is pulled toward a confusable class c' (another
class of its group, or any other class when groups have one class):

    x = (1 − d) μ_c + d μ_{c'} + σ ε,      ε ~ N(0, I_dim),  σ = NOISE

d = 0 is a prototypical point, d = 1 sits on the other class's centre (level 3 has something to find).
Everything is deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from hf_kd.files import write_atomic_dir

GROUP_SCALE = 3.0
CLASS_SCALE = 1.0
NOISE = 0.5


def class_centres(
    num_groups: int = 4, classes_per_group: int = 4, dim: int = 32, seed: int = 0
) -> np.ndarray:
    """Ground-truth centres μ_c = G g_{group(c)} + C o_c, shape [num_groups · classes_per_group, dim];
    class c belongs to group c // classes_per_group."""
    rng = np.random.default_rng(seed)
    groups = GROUP_SCALE * rng.standard_normal((num_groups, dim))
    offsets = CLASS_SCALE * rng.standard_normal((num_groups * classes_per_group, dim))
    return np.repeat(groups, classes_per_group, axis=0) + offsets


def make_hierarchy_dataset(
    num_groups: int = 4,
    classes_per_group: int = 4,
    dim: int = 32,
    n_per_class: int = 100,
    difficulty: float = 0.5,
    test_size: float = 0.2,
    seed: int = 0,
) -> DatasetDict:
    """train/test splits (stratified by label) with columns ``features`` (dim float32), ``label``
    (ClassLabel "g{group}_c{index in group}") and ``difficulty`` (d ∈ [0, ``difficulty``] ⊆ [0, 1])."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    num_classes = num_groups * classes_per_group
    centres = class_centres(num_groups, classes_per_group, dim, seed)
    rng = np.random.default_rng([seed, 1])
    labels = np.repeat(np.arange(num_classes), n_per_class)
    if classes_per_group > 1:
        start = labels // classes_per_group * classes_per_group
        other = start + (labels - start + rng.integers(1, classes_per_group, labels.size)) % classes_per_group
    else:
        other = (labels + rng.integers(1, num_classes, labels.size)) % num_classes
    d = rng.uniform(0.0, difficulty, labels.size)
    x = (1.0 - d)[:, None] * centres[labels] + d[:, None] * centres[other]
    x += NOISE * rng.standard_normal(x.shape)
    names = [f"g{c // classes_per_group}_c{c % classes_per_group}" for c in range(num_classes)]
    features = Features(
        {"features": List(Value("float32")), "label": ClassLabel(names=names), "difficulty": Value("float32")}
    )
    data = Dataset.from_dict(
        {"features": x.astype(np.float32), "label": labels, "difficulty": d.astype(np.float32)},
        features=features,
    )
    return data.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def class_groups(dataset: Dataset | DatasetDict) -> list[int]:
    """Group of each class, read from the ClassLabel names "g{group}_c{i}" of the ``label`` column."""
    if isinstance(dataset, DatasetDict):
        dataset = next(iter(dataset.values()))
    return [int(name.split("_")[0][1:]) for name in dataset.features["label"].names]


def write_hierarchy_dataset(path: str | Path, **kwargs) -> Path:
    """``make_hierarchy_dataset(**kwargs)`` saved with ``save_to_disk`` at ``path`` once (a temporary
    folder renamed into place); an existing dataset there is kept."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        return path
    return write_atomic_dir(path, lambda folder: make_hierarchy_dataset(**kwargs).save_to_disk(str(folder)))
