"""The knowledge report of a run taught by several teachers (``scripts/analyze.py --run`` on a
``teacher_source: mixture`` run): every teacher opened as the run opened it, the report's measures read
the mixture (or each row's routed teacher), and each teacher is named with its share, its accuracy and the
student's top-1 agreement and KL with it, equal to the same numbers computed here from the saved models."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import DatasetDict
from tiny import bert_classifier, save_model, sentiment_dataset, tiny_config, word_tokenizer

from hf_kd import DataArguments, ModelArguments, run_distillation
from hf_kd.runs.report import build_report
from hf_kd.runs.run_record import recipe_arguments
from scripts import analyze

WEIGHTS = {"x": 1, "y": 3}


def fit(tokenizer, seed: int, steps: int):
    """A tiny BERT trained ``steps`` full-batch Adam steps on 32 sentiment rows of its own."""
    model, rows = bert_classifier(len(tokenizer), seed=seed), sentiment_dataset(32, seed=seed + 10)
    enc = tokenizer(list(rows["text"]), truncation=True, max_length=16, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**enc, labels=torch.tensor(list(rows["label"]))).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """Two saved tiny BERT teachers of the student's tokenizer (weights 1 and 3; briefly trained, they
    disagree on some rows), a 4-step run taught by
    their mixture, and the test rows (a ``domain`` column naming a teacher for each row) as the models
    read them."""
    root = tmp_path_factory.mktemp("mixture_report")
    tokenizer = word_tokenizer()
    teachers = {n: fit(tokenizer, seed, steps) for n, seed, steps in (("x", 3, 8), ("y", 4, 12))}
    for name, model in teachers.items():
        save_model(model, tokenizer, root / name)
    tokenizer.save_pretrained(root / "tokenizer")
    test = sentiment_dataset(24, seed=1)
    test = test.add_column("domain", ["x" if i % 3 else "y" for i in range(len(test))])
    train = sentiment_dataset(32)
    train = train.add_column("domain", ["x"] * len(train))
    DatasetDict(train=train, test=test).save_to_disk(root / "data")
    data_args = DataArguments(
        task="text-classification", dataset_name=str(root / "data"), eval_split="test", max_length=16
    )
    model_args = ModelArguments(
        student_processor=str(root / "tokenizer"),
        student_config={"model_type": "bert", "vocab_size": len(tokenizer), "hidden_size": 16,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "max_position_embeddings": 64},
    )  # fmt: skip
    members = [{"name": n, "model": str(root / n), "weight": w} for n, w in WEIGHTS.items()]
    config = tiny_config(
        root / "run", teacher_source="mixture", teachers=members, alpha=0.5, max_steps=4,
        per_device_train_batch_size=8, eval_strategy="no",
    )  # fmt: skip
    run_distillation(data_args, model_args, config)
    enc = tokenizer(list(test["text"]), truncation=True, max_length=16, padding=True, return_tensors="pt")
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(root / "run").eval()
    with torch.no_grad():
        z = student(**enc).logits
        v = {name: model(**enc).logits for name, model in teachers.items()}
    return root, test, z, v


def agreement(z, v, labels):
    """The three numbers by hand: top-1 agreement, KL(softmax v ‖ softmax z), the teacher's accuracy."""
    kl = torch.nn.functional.kl_div(
        z.log_softmax(-1), v.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return (
        (z.argmax(-1) == v.argmax(-1)).double().mean().item(),
        kl.item(),
        (v.argmax(-1) == labels).double().mean().item(),
    )


def test_the_report_of_a_mixture_run_names_each_teacher_with_what_it_contributed(mixture_run, capsys):
    root, test, z, v = mixture_run
    report_dir = analyze.main(["--run", str(root / "run")])
    assert report_dir == root / "run" / "report"
    saved = json.loads((report_dir / "report.json").read_text())
    labels = torch.tensor(list(test["label"]))
    assert list(saved["teachers"]) == ["x", "y"]
    for name, weight in WEIGHTS.items():
        part = saved["teachers"][name]
        agree, kl, accuracy = agreement(z, v[name], labels)
        assert part["source"] == "online" and part["routed_share"] is None
        assert part["weight"] == pytest.approx(weight / sum(WEIGHTS.values()))
        assert part["top1_agreement"] == pytest.approx(agree)
        assert part["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert part["teacher_accuracy"] == pytest.approx(accuracy)
    assert saved["teachers"]["x"]["teacher_accuracy"] != saved["teachers"]["y"]["teacher_accuracy"]
    assert saved["teachers"]["x"]["top1_agreement"] != saved["teachers"]["y"]["top1_agreement"]
    # the report's own measures read what the student was taught: p = (1 p_x + 3 p_y) / 4
    mixed = torch.log(0.25 * v["x"].softmax(-1) + 0.75 * v["y"].softmax(-1))
    agree, _, accuracy = agreement(z, mixed, labels)
    assert saved["measures"]["health"]["top1_agreement"] == pytest.approx(agree)
    assert saved["measures"]["health"]["teacher_accuracy"] == pytest.approx(accuracy)
    x = saved["teachers"]["x"]
    row = f"| x | online | 0.25 | {x['top1_agreement']:.4g} | {x['kl']:.4g} | {x['teacher_accuracy']:.4g} |"
    markdown = (report_dir / "report.md").read_text()
    assert "## The teachers" in markdown and row in markdown
    assert "# Knowledge report: x + y → run on test" in markdown
    assert row in capsys.readouterr().out


def test_a_routed_report_gives_each_teachers_share_of_rows(mixture_run, tmp_path):
    """The same run read with ``teacher_routing_column: domain``: each row's teacher is the one its
    domain names; each teacher's share is the rows routed to it (its weight is not used)."""
    root, test, z, v = mixture_run
    data_args, _, config = recipe_arguments(root / "run")
    config.teacher_routing_column = "domain"
    content = build_report(
        data_args, config, teacher=None, student=str(root / "run"), report_dir=tmp_path / "routed"
    )
    routes = list(test["domain"])
    labels = torch.tensor(list(test["label"]))
    for name in WEIGHTS:
        part = content["teachers"][name]
        assert part["weight"] is None
        assert part["routed_share"] == pytest.approx(routes.count(name) / len(routes))
        assert part["top1_agreement"] == pytest.approx(agreement(z, v[name], labels)[0])
    routed = torch.stack([v[domain][i] for i, domain in enumerate(routes)])
    assert content["measures"]["health"]["teacher_accuracy"] == pytest.approx(agreement(z, routed, labels)[2])
    assert "| teacher | source | rows routed to it |" in (tmp_path / "routed" / "report.md").read_text()


def test_a_mixture_report_without_its_student_or_with_a_missing_teacher_is_refused(mixture_run, tmp_path):
    root, *_ = mixture_run
    data_args, _, config = recipe_arguments(root / "run")
    with pytest.raises(ValueError, match="several teachers needs their student"):
        build_report(data_args, config, teacher=None, student=None, report_dir=tmp_path / "r")
    config.teachers = [*config.teachers[:1], {"name": "z", "model": str(tmp_path / "gone")}]
    with pytest.raises(FileNotFoundError, match=r"teachers\['z'\].model=.*gone'.*no such directory"):
        build_report(data_args, config, teacher=None, student=str(root / "run"), report_dir=tmp_path / "r")
    record = json.loads((root / "run" / "run_record.json").read_text())
    del record["recipe"]["teachers"]  # as a record written before teachers were recorded
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run_record.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records teacher_source='mixture' without its teachers"):
        recipe_arguments(tmp_path / "old")
    config.teacher_source, config.teachers = "online", None
    with pytest.raises(ValueError, match="no teacher: teacher_source='online'"):
        build_report(data_args, config, teacher=None, student=str(root / "run"), report_dir=tmp_path / "r")
