"""Advice the tool prints agrees with README.md: the ``sparse_tail`` a capture, a cache check and a
training run recommend is the one README recommends for that cache (a sketch → ``sketch``; a flat
teacher's top-k → ``bucket``; a peaked teacher's → ``uniform``), read from README.md itself."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from test_codec import capture, write_lm_setup

from hf_kd.teachers.cache.advice import recommended_sparse_tail, sparse_tail_advice
from hf_kd.teachers.cache.kept_mass import KEPT_BINS, kept_mass_summary, report_kept_mass
from hf_kd.teachers.cache.load import load_teacher_cache
from hf_kd.teachers.codec import GolombTopkCodec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ADVICE = re.compile(r"[Tt]rain with sparse_tail: (\w+)")


def readme_bullet(start: str) -> str:
    """The README bullet that starts with ``start`` (up to the next bullet or blank line)."""
    match = re.search(rf"^- {re.escape(start)}.*?(?=^- |^\n)", README, re.S | re.M)
    assert match, f"README.md has no bullet starting {start!r}"
    return match.group(0)


def settings(bullet: str) -> dict[str, str]:
    """The ``field: value`` settings a bullet names in backticks."""
    return dict(re.findall(r"`(\w+): ([\w.-]+)`", bullet))


RECOMMENDED = settings(readme_bullet("**For ≤ 64 bytes/token at online KD's quality:**"))
FLAT_TOPK = readme_bullet("Use `sparse_tail: bucket`")


def test_the_readme_states_what_this_test_checks_against():
    assert RECOMMENDED == {
        "compression": "topk-golomb",
        "top_k": "24",
        "compression_mass": "0.99",
        "sketch_rank": "32",
        "sketch_bits": "4",
        "sparse_tail": "sketch",
    }
    assert "with any top-k cache of a flat teacher" in FLAT_TOPK
    assert "`uniform` is fine\n  for peaked teachers" in FLAT_TOPK


RECOMMENDED_TEXT = readme_bullet("**For ≤ 64 bytes/token at online KD's quality:**")


@pytest.mark.parametrize(
    "has_sketch, flat, readme, says",
    [
        (True, True, RECOMMENDED["sparse_tail"], (RECOMMENDED_TEXT, "trained with\n  `sparse_tail: sketch`")),
        (
            True,
            False,
            RECOMMENDED["sparse_tail"],
            (RECOMMENDED_TEXT, "trained with\n  `sparse_tail: sketch`"),
        ),
        (False, True, "bucket", (FLAT_TOPK, "Use `sparse_tail: bucket`")),
        (False, False, "uniform", (FLAT_TOPK, "`uniform` is fine\n  for peaked teachers")),
    ],
)
def test_every_advice_sentence_names_the_readmes_tail_for_its_cache(has_sketch, flat, readme, says):
    bullet, phrase = says
    assert phrase in bullet and readme in phrase  # what README recommends for this cache
    assert recommended_sparse_tail(has_sketch, flat)[0] == readme
    advice = sparse_tail_advice(has_sketch, flat, 32 if has_sketch else None)
    assert ADVICE.findall(advice)[0] == readme
    if not has_sketch and flat:  # and how to capture README's recommended cache
        assert "capture with sketch_rank: 32 and train with sparse_tail: sketch" in advice


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    return write_lm_setup(tmp_path_factory.mktemp("lm"))  # a random 1-layer teacher: flat


def test_a_capture_at_the_readmes_setting_advises_the_readmes_tail(lm_setup, tmp_path, caplog):
    fields = {
        "compression": RECOMMENDED["compression"],
        "top_k": int(RECOMMENDED["top_k"]),
        "compression_mass": float(RECOMMENDED["compression_mass"]),
        "sketch_rank": int(RECOMMENDED["sketch_rank"]),
        "sketch_bits": int(RECOMMENDED["sketch_bits"]),
    }
    with caplog.at_level(logging.INFO, logger="hf_kd.teachers.cache.kept_mass"):
        capture(lm_setup, tmp_path / "cache", **fields)
    kept = float(re.search(r"kept (\d\.\d+) of the teacher's probability mass", caplog.text).group(1))
    assert kept < 0.8  # the case of the issue: a flat teacher, below the capture's line
    assert ADVICE.findall(caplog.text) == [RECOMMENDED["sparse_tail"]]
    assert "rank-32 logit sketch" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the recommended setting

    cache = load_teacher_cache(tmp_path / "cache")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_kd.teachers.cache.load"):
        cache.check_sparse_tail("bucket")  # a sketch left unused: say so, and which tail uses it
    assert "leaves unused" in caplog.text and ADVICE.findall(caplog.text) == [RECOMMENDED["sparse_tail"]]
    caplog.clear()
    cache.check_sparse_tail("sketch")
    assert caplog.text == ""


def test_a_flat_top_k_cache_without_a_sketch_advises_bucket_or_the_readmes_cache(lm_setup, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_kd.teachers.cache.kept_mass"):
        capture(lm_setup, tmp_path / "plain", top_k=8, compression="topk-golomb", compression_mass=0.99)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and ADVICE.findall(warning[0]) == ["bucket", "sketch"]
    assert "capture with sketch_rank: 32 and train with sparse_tail: sketch" in warning[0]
    with pytest.raises(ValueError, match="has none: capture it with sketch_rank > 0") as refused:
        load_teacher_cache(tmp_path / "plain").check_sparse_tail("sketch")
    assert "'bucket' on a flat teacher" in str(refused.value) and "'uniform' on a peaked one" in str(
        refused.value
    )


def test_a_peaked_top_k_gives_no_tail_advice():
    kept = np.full(100, 0.95)
    summary = kept_mass_summary(__import__("torch").tensor(kept))
    assert len(summary) == 2 + KEPT_BINS
    assert report_kept_mass(summary, 8, GolombTopkCodec(8))["mean"] == pytest.approx(0.95)
