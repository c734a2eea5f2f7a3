"""The dataset card of a teacher cache: what it holds, how it was made, how to train from it."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from hf_kd.cards.markdown import format_value, markdown_table
from hf_kd.files import write_atomic
from hf_kd.teachers.cache.format import CacheMetadata


def dataset_card(metadata: CacheMetadata) -> DatasetCard:
    """A dataset card: Hub metadata (tags, one config whose splits are the arrow files) and a body
    with the provenance table and the commands that use the cache."""
    card_data = DatasetCardData(
        tags=["hf_kd", "knowledge-distillation", "teacher-logits"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"{name}/*.arrow"} for name in metadata.splits],
            }
        ],
    )
    stored = (
        "full logits"
        if metadata.top_k is None
        else f"top-{metadata.top_k} log-probabilities, their indices and the tail mass"
    )
    if metadata.compression is None:
        stored += f" in `{metadata.dtype}`"
    else:  # no float dtype: quantised log-probability codes
        codec = metadata.compression
        stored += f", packed by the `{codec['codec']}` codec as {codec['bits']}-bit log-probability codes"
    if metadata.sketch is not None:
        stored += (
            f", with a rank-{metadata.sketch['rank']} sketch of the logits for the tail "
            f"(`sparse_tail: sketch`; matrices in `{metadata.sketch['file']}`)"
        )
    rows = [
        [f"`{key}`", format_value(value)] for key, value in metadata.provenance().items() if value is not None
    ]
    splits = [
        [name, f"{record['num_rows']:,}", f"`{record['fingerprint'][:16]}`"]
        for name, record in metadata.splits.items()
    ]
    body = f"""# Teacher cache of `{metadata.teacher_id}`

Outputs of the teacher `{metadata.teacher_id}` ({metadata.task}) over {", ".join(f"`{n}`" for n in metadata.splits)},
captured once with [hf_kd](https://github.com/) {metadata.hf_kd_version}: the original rows plus the
teacher's {stored} (columns {", ".join(f"`{c}`" for c in metadata.columns)}), raw at temperature 1.

Train a student from it without loading the teacher:

```yaml
teacher_source: cached
teacher_cache: <this dataset id or a local copy>
```

Before training, hf_kd verifies the cache itself (the metadata against its digests, every file against
its checksum) and checks the metadata below against the run (rows, label space or vocabulary, tokenizer).

## Splits

{markdown_table(["Split", "Rows", "Source fingerprint"], splits)}

## Metadata

{markdown_table(["Field", "Value"], rows)}
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def write_dataset_card(folder: str | Path, metadata: CacheMetadata) -> Path:
    """Write :func:`dataset_card` as the cache folder's ``README.md`` (written aside, then renamed). The
    card is derived from the metadata and left out of its verified file list, so writing it changes no
    fact of the cache."""
    card = dataset_card(metadata)
    return write_atomic(Path(folder) / "README.md", lambda path: card.save(path))
