"""No secret in anything hf_kd writes or shows: one redaction (``hf_kd.redact``) knows every place a
token can hide, and every card, record, saved argument file, log line and error goes through it."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from distill_run import write_tiny_run

from hf_kd import DistillationConfig
from hf_kd.redact import REDACTED, redact, redact_logs_and_errors, redact_value

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "s3cr3t-value-9f8e7d"  # a secret that looks like nothing: only its name gives it away
HUB = "hf_" + "Q" * 34  # shaped like a Hub token, under a name that says nothing


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "text",
    [
        f"--hub_token {PLAIN}",
        f"--hub_token={PLAIN}",
        f"--api_key '{PLAIN}'",
        f'--teacher_model_init_kwargs \'{{"token": "{PLAIN}"}}\'',
        f"teacher_model_init_kwargs: {{token: {PLAIN}, dtype: float32}}",
        f"teacher_model_init_kwargs:\n  token: {PLAIN}\n  dtype: float32",
        f"hub_token: {PLAIN}",
        f"client_secret: {PLAIN}",
        f"DB_PASSWORD={PLAIN}",
        f"from_pretrained(name, token={PLAIN})",
        f"{{'auth': '{PLAIN}'}}",
        f"Some specified arguments are not used by the HfArgumentParser: ['--hub_token', '{PLAIN}']",
        f"Authorization: Bearer {PLAIN}",
        f"dataset_name: {HUB}",
        f"endpoint https://user:{PLAIN}@hub.example.org/api",
        "sk-proj-" + "A1b2" * 8,
        "ghp_" + "x" * 36,
        "AKIA" + "ABCDEFGHIJ012345",
    ],
)
def test_every_place_a_secret_hides_is_redacted(text):
    clean = redact(text)
    assert PLAIN not in clean and HUB not in clean and REDACTED in clean
    for secret in ("sk-proj-", "ghp_", "AKIA"):
        assert secret not in clean


@pytest.mark.parametrize(
    "text",
    [
        "--max_new_tokens 12",
        "tokenizer: gpt2",
        "author: someone",
        "num_tokens: 5",
        "--monkey 3",
        "time: 12:30",
    ],
)
def test_names_that_only_contain_a_secret_word_are_kept(text):
    assert redact(text) == text


def test_nested_values_are_redacted_by_name_at_any_depth():
    value = {"a": {"b": [{"token": PLAIN, "dtype": "bfloat16"}]}, "note": f"uses {HUB}", "hub_token": None}
    assert redact_value(value) == {
        "a": {"b": [{"token": REDACTED, "dtype": "bfloat16"}]},
        "note": f"uses {REDACTED}",
        "hub_token": None,
    }
    assert value["a"]["b"][0]["token"] == PLAIN  # the input is left as it was


def test_saved_arguments_and_their_text_carry_no_secret(tmp_path):
    config = DistillationConfig(
        output_dir=str(tmp_path),
        hub_token=HUB,
        teacher_model_init_kwargs={"token": PLAIN, "dtype": "float32"},
        run_name=f"run with {HUB}",
        use_cpu=True,
    )
    torch.save(config, tmp_path / "training_args.bin")
    data = (tmp_path / "training_args.bin").read_bytes()
    assert PLAIN.encode() not in data and HUB.encode() not in data
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.hub_token is None and loaded.teacher_model_init_kwargs == {
        "token": None,
        "dtype": "float32",
    }
    assert config.teacher_model_init_kwargs["token"] == PLAIN  # the running config keeps it
    for text in (str(config), json.dumps(config.to_dict()), config.to_json_string()):
        assert PLAIN not in text and HUB not in text


def test_a_run_writes_no_secret_in_any_file_log_or_output(tmp_path, capfd, caplog):
    recipe = write_tiny_run(tmp_path, save_strategy="steps", save_steps=2)
    flags = ["--hub_token", HUB, "--teacher_model_init_kwargs", json.dumps({"token": PLAIN})]
    flags += ["--run_name", f"named {HUB}"]
    with caplog.at_level(logging.INFO):
        load_script("distill").main(["--config", str(recipe), *flags])
    out = tmp_path / "out"
    files = [path for path in out.rglob("*") if path.is_file()]
    names = {path.relative_to(out).as_posix() for path in files}
    assert {"README.md", "run_record.json", "training_args.bin", "checkpoint-4/training_args.bin"} <= names
    for path in files:
        data = path.read_bytes()
        assert PLAIN.encode() not in data and HUB.encode() not in data, path
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert PLAIN not in text and HUB not in text
    card = (out / "README.md").read_text()
    assert '--teacher_model_init_kwargs \'{"token": "<redacted>"}\'' in card


def test_an_unknown_flag_error_does_not_echo_the_token(capfd):
    with pytest.raises(ValueError, match="not used") as error:
        load_script("cache_teacher").main(
            ["--teacher_model_name_or_path", "t", "--output_dir", "o", "--hub_token", PLAIN]
        )
    assert PLAIN not in str(error.value) and REDACTED in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_log_lines_and_uncaught_errors_are_redacted(caplog, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    factory = logging.getLogRecordFactory()
    try:
        redact_logs_and_errors()
        with caplog.at_level(logging.INFO):
            logging.getLogger("anything").info("loading with %s", {"token": PLAIN})
        assert PLAIN not in caplog.text and REDACTED in caplog.text
        try:
            raise RuntimeError(f"request failed with token={PLAIN}")
        except RuntimeError as error:
            sys.excepthook(type(error), error, error.__traceback__)
        err = capsys.readouterr().err
        assert "RuntimeError: request failed with token=<redacted>" in err and PLAIN not in err
    finally:
        logging.setLogRecordFactory(factory)
