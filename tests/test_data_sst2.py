import json
from pathlib import Path

import pytest

from tasktune.config import DataConfig
from tasktune.tasks import get_task

from tasktune.errors import TasktuneError
from tiny import write_sst2_jsonl

sst2 = get_task("sst2")


def test_glue_tsv(sst2_tsv):
    rows, source = sst2.load(str(sst2_tsv))
    assert len(rows) == 120 and source == str(sst2_tsv)
    assert rows[0]["id"] == 0 and rows[0]["label"] in (0, 1)
    # The text exactly as given: GLUE's space before the tab stays, as lm-evaluation-harness keeps it.
    assert rows[0]["text"].endswith(" ") and rows[0]["text"] == sst2_tsv.read_text().splitlines()[1].split("\t")[0]


def test_kaggle_csv_columns_and_word_labels(tmp_path):
    path = tmp_path / "sst2.csv"
    path.write_text('Reviews,Ratings\n"a fine, warm film",positive\nawful,0\n', encoding="utf-8")
    rows, _ = sst2.load(str(path))
    assert [(r["text"], r["label"]) for r in rows] == [("a fine, warm film", 1), ("awful", 0)]


def test_jsonl(tmp_path):
    rows, _ = sst2.load(str(write_sst2_jsonl(tmp_path / "train.jsonl")))
    assert len(rows) == 40 and {r["label"] for r in rows} == {0, 1}


def test_data_dir_env(tmp_path, monkeypatch, sst2_tsv):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text(sst2_tsv.read_text())
    monkeypatch.setenv("TASKTUNE_DATA_DIR", str(tmp_path))
    rows, source = sst2.load(None)
    assert len(rows) == 120 and source.endswith("sst2/train.tsv")


def test_resolution_order_env_then_embedded(tmp_path, monkeypatch, sst2_tsv):
    """No path: $TASKTUNE_DATA_DIR/<task>/ wins; without it (or with it empty) the embedded copy is read."""
    from tasktune.data import EMBEDDED_DIR, origin

    monkeypatch.delenv("TASKTUNE_DATA_DIR", raising=False)
    rows, source = sst2.load(None)
    assert Path(source) == EMBEDDED_DIR / "sst2" / "train.tsv.gz" and origin([Path(source)]) == "embedded"
    assert len(rows) == 67349 and sum(r["label"] for r in rows) == 37569
    (tmp_path / "sst2").mkdir()
    monkeypatch.setenv("TASKTUNE_DATA_DIR", str(tmp_path))
    assert sst2.load(None)[1].endswith("train.tsv.gz")  # an empty data dir falls through
    (tmp_path / "sst2" / "train.tsv").write_text(sst2_tsv.read_text())
    rows, source = sst2.load(None)
    assert len(rows) == 120 and origin([Path(source)]) == "TASKTUNE_DATA_DIR"


def test_gzip_files_and_bad_gzip(tmp_path, sst2_tsv):
    import gzip

    packed = tmp_path / "train.tsv.gz"
    packed.write_bytes(gzip.compress(sst2_tsv.read_bytes()))
    assert sst2.load(str(packed))[0] == sst2.load(str(sst2_tsv))[0]
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(sst2_tsv.read_bytes())
    with pytest.raises(TasktuneError, match="not a valid gzip file"):
        sst2.load(str(bad))


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("sentence,label\nfine,1\n", "wrong delimiter"),
    ("text\tscore\nfine\t1\n", "do not include a text column"),
    ("sentence\tlabel\nfine\t2\n", "label '2' is not one of the task's labels"),
    ("sentence\tlabel\nfine\tNone\n", "label 'None' is not one of the task's labels"),
    ("sentence\tlabel\n   \t1\n", "empty text"),
    ("sentence\tlabel\nfine\t1\textra\n", "3 fields, expected 2"),
    ("sentence\tlabel\n", "no data rows"),
])
def test_bad_tsv(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TasktuneError, match=message) as err:
        sst2.load(str(path))
    assert str(path) in str(err.value)


def test_bad_row_is_named(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence\tlabel\nfine\t1\nbad\t7\n")
    with pytest.raises(TasktuneError, match=r"row 3, field 'label'"):
        sst2.load(str(path))


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(TasktuneError, match="line 2: invalid UTF-8"):
        sst2.load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(TasktuneError, match="does not exist"):
        sst2.load(str(tmp_path / "nope.tsv"))


def test_bad_jsonl(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"sentence": "ok", "label": 1}) + "\n{broken\n")
    with pytest.raises(TasktuneError, match="line 2: not valid JSON"):
        sst2.load(str(path))


def test_unknown_extension(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("x")
    with pytest.raises(TasktuneError, match="unknown data format"):
        sst2.load(str(path))


def test_split_is_stratified_disjoint_and_deterministic(tmp_path):
    from tiny import write_sst2_tsv

    rows, _ = sst2.load(str(write_sst2_tsv(tmp_path / "t.tsv", n=1000)))
    # Make the classes unbalanced (30/70) so stratification is visible.
    rows = [r for r in rows if r["label"] == 1 or r["id"] % 10 < 4]
    cfg = DataConfig(seed=7, val_size=50, split_by="row")
    split = get_task("sst2").split(rows, cfg)
    assert split == get_task("sst2").split(rows, cfg)
    assert split != get_task("sst2").split(rows, DataConfig(seed=8, val_size=50, split_by="row"))
    ids = [set(v) for v in split.values()]
    assert sum(len(s) for s in ids) == len(rows) and len(set().union(*ids)) == len(rows)
    assert len(split["validation"]) == 50
    by_id = {r["id"]: r["label"] for r in rows}
    overall = sum(by_id.values()) / len(rows)
    assert overall == pytest.approx(500 / 700)
    for part in split.values():
        assert set(part) <= set(by_id)
        assert abs(sum(by_id[i] for i in part) / len(part) - overall) < 0.02
    assert abs(len(split["test"]) / len(rows) - 0.2) < 0.01


def phrase_rows(n_sentences: int = 200) -> list[dict]:
    """SST-2-like rows: each sentence also appears as its phrases (every suffix of 2+ words), as in GLUE."""
    from tiny import sentiment_rows

    rows = []
    for sentence, label in sentiment_rows(n_sentences, seed=3):
        words = sentence.split()
        for start in range(len(words) - 1):
            text = " ".join(words[start:]) + " "
            rows.append({"id": len(rows), "text": text, "label": label, "fields": {"text": text}})
    return rows


def test_sentence_split_keeps_every_phrase_with_its_sentence():
    rows = phrase_rows()
    task = get_task("sst2")
    by_id = {r["id"]: r for r in rows}
    leak_free = task.split(rows, DataConfig(seed=1, val_size=60))
    assert leak_free == task.split(rows, DataConfig(seed=1, val_size=60, split_by="sentence"))
    parts = {k: [by_id[i] for i in v] for k, v in leak_free.items()}
    assert sum(len(v) for v in parts.values()) == len(rows)
    seen = parts["train"] + parts["validation"]
    overlap = task.overlap(seen, parts["test"])
    assert overlap["contained_in_training"] == 0 and overlap["exact_duplicates"] == 0
    assert task.overlap(parts["train"], parts["validation"])["contained_in_training"] == 0
    assert 0.1 < len(parts["test"]) / len(rows) < 0.25  # about test_size of the sentences, with their phrases
    # The seed's row-level split puts phrases of test sentences into training, and the report measures it.
    by_row = task.split(rows, DataConfig(seed=1, val_size=60, split_by="row"))
    rows_overlap = task.overlap([by_id[i] for i in by_row["train"] + by_row["validation"]],
                                [by_id[i] for i in by_row["test"]])
    assert rows_overlap["contained_rate"] > 0.5


def test_text_overlap_counts():
    from tasktune.data.split import text_overlap

    result = text_overlap(["a fine film", "fine film", "Fine  FILM", "a dull film", "film"],
                          ["it is a fine film indeed", "fine film"])
    assert result["exact_duplicates"] == 2  # "fine film" and its case/space variant
    assert result["contained_in_training"] == 4  # all but "a dull film"
    assert result["contained_rate"] == pytest.approx(0.8)


def test_real_sst2_file(shared_data):
    rows, _ = sst2.load(str(shared_data / "sst2" / "train.tsv"))
    assert len(rows) == 67349
    assert sum(r["label"] for r in rows) == 37569


def test_training_sample_takes_the_share_of_whole_sentences_asked_for():
    """data.train_sentences: that share of the sampled training rows are whole sentences, exactly; where one
    kind runs out the sample shrinks rather than drift back to the file's mix. Red when the share is ignored."""
    rows = phrase_rows()
    task = get_task("sst2")
    training_sample = task.training_sample
    split = task.split(rows, DataConfig(seed=1, val_size=60))
    by_id = {r["id"]: r for r in rows}
    train = [by_id[i] for i in split["train"]]
    n_sentences = sum(r["sentence"] for r in train)
    uniform = training_sample(train, DataConfig(seed=1, limit_train=40))
    assert len(uniform) == 40 and sum(r["sentence"] for r in uniform) < 20  # the file is mostly phrases
    half = training_sample(train, DataConfig(seed=1, limit_train=40, train_sentences=0.5))
    assert len(half) == 40 and sum(r["sentence"] for r in half) == 20
    assert [r["id"] for r in half] == sorted(r["id"] for r in half)  # the file's order, like every sample
    assert half == training_sample(train, DataConfig(seed=1, limit_train=40, train_sentences=0.5))  # seeded
    only = training_sample(train, DataConfig(seed=1, limit_train=10 * n_sentences, train_sentences=1.0))
    assert len(only) == n_sentences and all(r["sentence"] for r in only)
    assert training_sample(train, DataConfig(seed=1, train_sentences=1.0)) == only  # unset limit: all it can
    none = training_sample(train, DataConfig(seed=1, limit_train=40, train_sentences=0.0))
    assert len(none) == 40 and not any(r["sentence"] for r in none)
    phrases_only = [r for r in train if not r["sentence"]]
    for share in (0.5, 1.0):  # a mixed share and an all-sentence share, with no sentence to take
        with pytest.raises(TasktuneError, match="no sample has that share"):
            training_sample(phrases_only, DataConfig(seed=1, limit_train=40, train_sentences=share))


def test_train_sentences_needs_sentence_flags():
    training_sample = get_task("sst2").training_sample
    rows = [{"id": i, "text": f"row {i}", "label": i % 2} for i in range(10)]
    with pytest.raises(TasktuneError, match="data.train_sentences=0.5 needs a sentence-split"):
        training_sample(rows, DataConfig(train_sentences=0.5, limit_train=4))


def test_limit_validation_takes_whole_sentences_first(tiny_llama, tmp_path):
    """data.limit_validation samples the validation slice as data.limit_test samples the test split: every whole
    sentence first, so the figure that early stopping and a sweep read measures what the headline measures."""
    from tasktune.config import load_recipe
    from tasktune.stages import prepare

    data = tmp_path / "phrases.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in phrase_rows()))
    overrides = [f"model={tiny_llama}", f"data.path={data}", "data.val_size=80", "dtype=fp32"]
    whole = prepare(load_recipe("sst2-gemma3-270m-cpu", overrides), training=False).examples["validation"]
    sentences = sum(r["sentence"] for r in whole)
    assert 0 < sentences < len(whole) - 12
    sampled = prepare(load_recipe("sst2-gemma3-270m-cpu", overrides + [f"data.limit_validation={sentences + 4}"]),
                      training=False).examples["validation"]
    assert len(sampled) == sentences + 4 and sum(r["sentence"] for r in sampled) == sentences


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_train_sentences_outside_the_unit_interval_is_refused(value, capsys):
    from tasktune.cli import main

    assert main(["run", "sst2-gemma3-270m-cpu", f"data.train_sentences={value}", "--print-config"]) == 2
    assert f"train_sentences must be in [0, 1], got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, extra", [("squad2-gemma3-270m-cpu", []),
                                           ("sst2-gemma3-270m-cpu", ["data.split_by=row"])])
def test_train_sentences_without_a_sentence_split_is_refused_before_anything_loads(recipe, extra, capsys):
    from tasktune.cli import main

    assert main(["run", recipe, "data.train_sentences=0.5", *extra, "--print-config"]) == 2
    assert "data.train_sentences needs rows split as whole sentences and phrases" in capsys.readouterr().err
