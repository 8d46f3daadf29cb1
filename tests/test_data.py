"""peftkit.data: file formats, causal-LM and classification examples, bucketed batching, answer extraction.

Tokenizers are tiny word-level ones built here (offline); no test reads ../shared/data.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import pytest
import torch

from peftkit import ConfigError
from peftkit.data import (
    IGNORE_INDEX,
    DroppedExamplesWarning,
    batches,
    build_causal_lm_examples,
    build_classification_examples,
    check_prompt_format,
    extract_answer,
    load_records,
    pad_count,
)

from .tiny_tokenizers import bert_tok as _bert_tok
from .tiny_tokenizers import llama_tok as _llama_tok


@pytest.fixture(scope="module")
def llama_tok():
    return _llama_tok()


@pytest.fixture(scope="module")
def bert_tok():
    return _bert_tok()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- file formats

def test_jsonl_skips_blank_lines_and_renames_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "what is two", "answer": "#### 2", "id": 1}\n\n{"question": "q2", "answer": "a2", "id": 2}\n')
    recs = load_records(p, columns={"prompt": "question", "completion": "answer"})
    assert recs == [{"id": 1, "prompt": "what is two", "completion": "#### 2"}, {"id": 2, "prompt": "q2", "completion": "a2"}]


def test_bad_jsonl_line_is_named_by_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,,}\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: invalid JSON on line 3"):
        load_records(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ConfigError, match="line 2 is a JSON list"):
        load_records(p)


def test_json_list_columnar_and_jsonl_named_json(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "hello", "label": 1}, {"text": "bye", "label": 0}]))
    assert load_records(p) == [{"text": "hello", "label": 1}, {"text": "bye", "label": 0}]
    p.write_text(json.dumps({"text": ["hello", "bye"], "label": [1, 0]}))
    assert load_records(p) == [{"text": "hello", "label": 1}, {"text": "bye", "label": 0}]
    p.write_text('{"text": "hello"}\n{"text": "bye"}\n')
    assert load_records(p) == [{"text": "hello"}, {"text": "bye"}]
    p.write_text('"just a string"')
    with pytest.raises(ConfigError, match="expected a JSON list of objects"):
        load_records(p)


def test_csv_with_quoted_commas_and_newlines(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"good, very good",positive\n"bad ""really"", bad",negative\n"two\nlines",positive\n')
    recs = load_records(p)
    assert recs == [{"text": "good, very good", "label": "positive"}, {"text": 'bad "really", bad', "label": "negative"},
                    {"text": "two\nlines", "label": "positive"}]


def test_tsv_with_header_sst2_style(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text('sentence\tlabel\nit \'s a charming " journey . \t1\nbleak and desperate \t0\n')
    recs = load_records(p, columns={"text": "sentence"})
    assert recs == [{"label": "1", "text": 'it \'s a charming " journey . '}, {"label": "0", "text": "bleak and desperate "}]


def test_tsv_without_header(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("a fine movie\t1\nan awful movie\t0\n")
    assert load_records(p) == [{"0": "a fine movie", "1": "1"}, {"0": "an awful movie", "1": "0"}]
    assert load_records(p, columns={"text": "0", "label": "1"})[1] == {"text": "an awful movie", "label": "0"}
    # Text-only rows: forced either way with has_header.
    q = tmp_path / "t.tsv"
    q.write_text("prompt\tcompletion\nhello there\tgeneral kenobi\n")
    assert load_records(q) == [{"prompt": "hello there", "completion": "general kenobi"}]
    assert len(load_records(q, has_header=False)) == 2
    assert load_records(p, has_header=True) == [{"a fine movie": "an awful movie", "1": "0"}]


def test_missing_column_names_it_and_the_closest(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(ConfigError, match=r"column 'sentense' \(for 'text'\) not found.*did you mean 'sentence'"):
        load_records(p, columns={"text": "sentense"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"not found.*did you mean 'train.jsonl'"):
        (tmp_path / "train.jsonl").write_text('{"a": 1}\n')
        load_records(tmp_path / "trian.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_records(tmp_path / "empty.csv")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no records"):
        load_records(tmp_path / "blank.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"unknown data format '\.parquet'"):
        load_records(tmp_path / "d.parquet")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(ConfigError, match=r"ragged\.csv:3: line 3 has 1 fields, expected 2"):
        load_records(tmp_path / "ragged.csv")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face datasets directory"):
        load_records(tmp_path / "plain_dir")


def test_datasets_dir_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    (d / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_records(d)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="the optional 'datasets' package is not installed")
def test_datasets_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"sentence": ["hello", "bye"], "label": [1, 0]}).save_to_disk(str(tmp_path / "one"))
    assert load_records(tmp_path / "one", columns={"text": "sentence"}) == [{"label": 1, "text": "hello"},
                                                                              {"label": 0, "text": "bye"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                               "test": datasets.Dataset.from_dict({"text": ["b"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match="several splits"):
        load_records(tmp_path / "dict")
    assert load_records(tmp_path / "dict" / "test") == [{"text": "b"}]


# ----------------------------------------------------------------------------------------------- causal LM

def test_labels_are_ignored_exactly_on_prompt_tokens(llama_tok):
    recs = [{"prompt": "what is two plus three", "completion": "five"}, {"prompt": "hello", "completion": "world the end"}]
    exs = build_causal_lm_examples(recs, llama_tok, max_length=32)
    bos, eos = llama_tok.bos_token_id, llama_tok.eos_token_id
    for r, ex in zip(recs, exs, strict=True):
        p, c = _ids(llama_tok, r["prompt"]), _ids(llama_tok, r["completion"])
        assert ex["input_ids"] == [bos, *p, *c, eos]  # one BOS at the start, none in the middle, eos appended
        assert ex["labels"] == [-100] * (1 + len(p)) + [*c, eos]


def test_bert_style_tokenizer_keeps_cls_and_no_sep_in_the_middle(bert_tok):
    ex = build_causal_lm_examples([{"prompt": "hello world", "completion": "yes"}], bert_tok, max_length=16)[0]
    toks = bert_tok.convert_ids_to_tokens(ex["input_ids"])
    assert toks == ["[CLS]", "hello", "world", "yes", "[SEP]"]  # no eos: the completion ends with [SEP]
    assert ex["labels"][:3] == [-100] * 3 and ex["labels"][3:] == ex["input_ids"][3:]


def test_truncation_keeps_the_prompt_start_and_drops_examples_without_completion(llama_tok):
    recs = [{"prompt": "a b c", "completion": "d e f g"},  # 1 + 3 + 4 + 1 = 9 tokens -> cut to 6
            {"prompt": "a b c d e f", "completion": "g"},  # the prompt with BOS fills 7 >= 6: dropped
            {"prompt": "a", "completion": "b"}]
    with pytest.warns(DroppedExamplesWarning, match="dropped 1 of 3 examples"):
        exs = build_causal_lm_examples(recs, llama_tok, max_length=6)
    assert len(exs) == 2
    assert llama_tok.convert_ids_to_tokens(exs[0]["input_ids"]) == ["<s>", "a", "b", "c", "d", "e"]
    assert exs[0]["labels"][:4] == [-100] * 4 and exs[0]["labels"][4:] == exs[0]["input_ids"][4:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        build_causal_lm_examples(recs[2:], llama_tok, max_length=6)


def test_rows_without_a_schema_name_the_missing_column(llama_tok):
    with pytest.raises(ConfigError, match=r"record 2 has neither a 'prompt'.*nor a 'messages'.*did you mean 'prompts'.*"
                                          r"columns present: 'prompts', 'answer'"):
        build_causal_lm_examples([{"prompt": "a", "completion": "b"}, {"prompts": "a", "answer": "b"}], llama_tok, 8)
    with pytest.raises(ConfigError, match=r"'prompt' column but no 'completion' column \(did you mean 'completions'"):
        build_causal_lm_examples([{"prompt": "a", "completions": "b"}], llama_tok, 8)
    with pytest.raises(ConfigError, match=r"column 'prompt' must be text, got list"):
        build_causal_lm_examples([{"prompt": ["a"], "completion": "b"}], llama_tok, 8)


def test_chat_loss_only_on_assistant_turns(llama_tok):
    msgs = [{"role": "system", "content": "yes"}, {"role": "user", "content": "what is two plus two"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three plus three"},
            {"role": "assistant", "content": "six the answer"}]
    exs = build_causal_lm_examples([{"messages": msgs}, {"messages": json.dumps(msgs[1:3])}], llama_tok, max_length=64)
    ex = exs[0]
    text = llama_tok.apply_chat_template(msgs, tokenize=False)
    assert ex["input_ids"] == _ids(llama_tok, text)  # the template's rendering, no BOS added on top
    trained = [llama_tok.convert_ids_to_tokens(i) if lab != -100 else None for i, lab in zip(ex["input_ids"], ex["labels"],
                                                                                               strict=True)]
    spans, cur = [], []
    for t in trained:
        if t is None and cur:
            spans.append(cur)
            cur = []
        elif t is not None:
            cur.append(t)
    spans.append(cur)
    assert spans == [["four", "<|end|>"], ["six", "the", "answer", "<|end|>"]]  # not the <|assistant|> header
    assert llama_tok.convert_ids_to_tokens([i for i, lab in zip(exs[1]["input_ids"], exs[1]["labels"], strict=True)
                                            if lab != -100]) == ["four", "<|end|>"]
    # Truncated before any assistant token: dropped.
    with pytest.warns(DroppedExamplesWarning, match="dropped 1 of 1"):
        assert build_causal_lm_examples([{"messages": msgs}], llama_tok, max_length=5) == []


def test_chat_errors(llama_tok, bert_tok):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    with pytest.raises(ConfigError, match="tokenizer has no chat template"):
        build_causal_lm_examples([{"messages": msgs}], bert_tok, 16)
    with pytest.raises(ConfigError, match="no 'assistant' message"):
        build_causal_lm_examples([{"messages": msgs[:1]}], llama_tok, 16)
    with pytest.raises(ConfigError, match=r"message 1 must have 'role' and 'content' keys, found \['role', 'text'\]"):
        build_causal_lm_examples([{"messages": [msgs[0], {"role": "assistant", "text": "x"}]}], llama_tok, 16)


# ----------------------------------------------------------------------------------------------- classification

def test_classification_string_labels_and_pairs(bert_tok):
    recs = [{"text": "good movie", "other": "yes", "label": "positive"},
            {"text": "bad movie", "other": "no", "label": "negative"}]
    exs, names = build_classification_examples(recs, bert_tok, max_length=16, text_pair_col="other")
    assert names == ["negative", "positive"] and [e["labels"] for e in exs] == [1, 0]
    assert bert_tok.convert_ids_to_tokens(exs[0]["input_ids"]) == ["[CLS]", "good", "movie", "[SEP]", "yes", "[SEP]"]
    assert exs[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1] and exs[0]["attention_mask"] == [1] * 6
    assert all(type(v) is list for e in exs for k, v in e.items() if k != "labels")
    short, _ = build_classification_examples(recs, bert_tok, max_length=4, text_pair_col="other")
    assert len(short[0]["input_ids"]) == 4


def test_classification_int_labels_numeric_order_and_given_labels(bert_tok):
    recs = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": "2"}]
    exs, names = build_classification_examples(recs, bert_tok, 8)
    assert names == ["2", "10"] and [e["labels"] for e in exs] == [1, 0, 0]
    # Given names: eval data maps to the same indices; 0/1 read as indices when the names are not integers.
    sst = [{"text": "a", "label": "1"}, {"text": "b", "label": 0}, {"text": "c", "label": "positive"}]
    exs, names = build_classification_examples(sst, bert_tok, 8, labels=["negative", "positive"])
    assert names == ["negative", "positive"] and [e["labels"] for e in exs] == [1, 0, 1]
    with pytest.raises(ConfigError, match=r"unknown label 'neutral' in record 2.*known labels: 'negative', 'positive'"):
        build_classification_examples([sst[0], {"text": "x", "label": "neutral"}], bert_tok, 8, labels=["negative", "positive"])
    with pytest.raises(ConfigError, match=r"unknown label '7'.*known labels: '2', '10'"):
        build_classification_examples([{"text": "x", "label": 7}], bert_tok, 8, labels=["2", "10"])


def test_classification_missing_column(bert_tok):
    with pytest.raises(ConfigError, match=r"record 1 has no column 'text' \(did you mean 'txt'\?\); columns present: 'txt'"):
        build_classification_examples([{"txt": "a", "label": 1}], bert_tok, 8)


# ----------------------------------------------------------------------------------------------- batching

def _varied(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (n,), generator=g).tolist()
    return [{"input_ids": [5] * n_, "labels": i} for i, n_ in enumerate(lengths)]


def test_batches_are_deterministic_and_cover_every_example_once():
    exs = _varied()
    a = batches(exs, 8, pad_id=0, shuffle=True, seed=3)
    b = batches(exs, 8, pad_id=0, shuffle=True, seed=3)
    c = batches(exs, 8, pad_id=0, shuffle=True, seed=4)
    flat = lambda bs: [int(x) for bt in bs for x in bt["labels"]]
    assert flat(a) == flat(b) and flat(a) != flat(c)
    for bs in (a, c, batches(exs, 8, 0, shuffle=False, seed=0), batches(exs, 8, 0, shuffle=True, seed=0, bucket=False)):
        assert sorted(flat(bs)) == list(range(len(exs)))
    dropped = batches(exs[:21], 8, 0, shuffle=True, seed=0, drop_last=True)
    assert [len(bt["labels"]) for bt in dropped] == [8, 8]


def test_bucketing_reduces_padding():
    exs = _varied(400)
    bucketed = batches(exs, 8, 0, shuffle=True, seed=0, bucket=True)
    plain = batches(exs, 8, 0, shuffle=True, seed=0, bucket=False)
    assert pad_count(bucketed) < pad_count(plain) / 2


def test_padding_values():
    exs = [{"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}, {"input_ids": [7], "labels": [7]}]
    (bt,) = batches(exs, 2, pad_id=1, shuffle=False, seed=0, bucket=False)
    assert bt["input_ids"].tolist() == [[7, 8, 9], [7, 1, 1]]
    assert bt["labels"].tolist() == [[-100, 8, 9], [7, -100, -100]]
    assert bt["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and bt["input_ids"].dtype == torch.long
    cls = [{"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 1], "labels": 1},
           {"input_ids": [2], "attention_mask": [1], "token_type_ids": [0], "labels": 0}]
    (bt,) = batches(cls, 4, pad_id=0, shuffle=False, seed=0)
    assert bt["labels"].tolist() in ([1, 0], [0, 1]) and bt["token_type_ids"].shape == (2, 2)
    with pytest.raises(ConfigError, match="pad_id"):
        batches(cls, 4, pad_id=None, shuffle=False, seed=0)


# ----------------------------------------------------------------------------------------------- answers

@pytest.mark.parametrize(("text", "want"), [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("so the total is\n#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("He owes 16-3 = <<16-3=13>>13\n#### -13.50", "-13.5"),
    ("#### 0.25\n\nQuestion: next one\n#### 99", "0.25"),  # a generation that runs on: the first marker wins
    ("The answer is $1,234,567.", "1234567"),  # no marker: the last number
    ("It costs 3.5 dollars, or 2 dollars each", "2"),
    ("a temperature of -7 degrees", "-7"),
    ("16-3 = 13", "13"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_prompt_formats_train_and_generate_on_the_same_tokens():
    """Under every format the ids generation starts from are exactly the prompt part of the training example."""
    from peftkit.data import apply_prompt_format, prompt_ids

    tok = _llama_tok()
    rec = [{"prompt": "red blue", "completion": "blue red"}]
    for fmt in ("plain", "chat", "Q: {prompt}\nA:"):
        ex = build_causal_lm_examples(apply_prompt_format(rec, fmt), tok, 128)[0]
        start = next(i for i, x in enumerate(ex["labels"]) if x != IGNORE_INDEX)
        assert ex["input_ids"][:start] == prompt_ids(tok, ["red blue"], fmt)[0], fmt
    chat = apply_prompt_format(rec, "chat")[0]
    assert chat["messages"] == [{"role": "user", "content": "red blue"}, {"role": "assistant", "content": "blue red"}]
    assert apply_prompt_format(rec, "Q: {prompt}")[0]["prompt"] == "Q: red blue"
    with pytest.raises(ConfigError, match="did you mean 'chat'"):
        apply_prompt_format(rec, "chta")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        check_prompt_format("chat", tok)
