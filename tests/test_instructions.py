"""Instruction data for causal LMs: templates, response-only loss, generated-answer exact match."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from raffm_core.errors import DataError
from raffm_core.task import load_task
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.encode import encode_task, make_loader
from raffm_core.task.instructions import (
    InstructionSettings,
    answers_match,
    encode_prompts,
    generate_answers,
    parse_number,
    template_fields,
)
from raffm_core.task.metrics import evaluate_model
from raffm_core.task.prompts import IGNORE_INDEX
from tests.models import CONFIGS

NAMES = ["tom", "ann", "bob", "sue"]
THINGS = ["apples", "pens", "cats"]
WORDS = ["has", "gets", "more", "how", "many", "does", "have", "?", ".", "Answer", ":", "he", "she"]
DIGITS = [str(i) for i in range(20)]
TEMPLATE = "{Body} {Question}\nAnswer:"


def word_tokenizer(padding_side: str = "right") -> T.PreTrainedTokenizerFast:
    """One token per word, number or punctuation mark: token counts can be worked out by hand."""
    vocab = {
        w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *NAMES, *THINGS, *WORDS, *DIGITS])
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        padding_side=padding_side,
    )


def tiny_llama(tok: T.PreTrainedTokenizerFast, seed: int = 0) -> T.LlamaForCausalLM:
    """The tiny LLaMA of :data:`tests.models.CONFIGS` as a causal LM over ``tok``'s words."""
    config = CONFIGS["llama"]()
    config.vocab_size, config.pad_token_id, config.eos_token_id = (
        len(tok),
        tok.pad_token_id,
        tok.eos_token_id,
    )
    config.bos_token_id = None
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(config).eval()


def svamp_rows(n: int, seed: int = 0) -> list[dict]:
    """SVAMP-shaped rows (``Body``, ``Question``, a float ``Answer``): the answer is in the body."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, thing, count = rng.choice(NAMES), rng.choice(THINGS), rng.randint(0, 19)
        rows.append(
            {
                "ID": f"s{i}",
                "Body": f"{name} has {count} {thing} .",
                "Question": f"how many {thing} does {name} have ?",
                "Answer": float(count),
            }
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_template_fields_are_the_columns_a_template_reads():
    assert template_fields("{Body} {Question}\nAnswer:") == ["Body", "Question"]
    assert template_fields("{a.b} {c[0]} {a}") == ["a", "c"]


def test_the_loss_covers_the_response_tokens_only(tmp_path):
    tok = word_tokenizer()
    ds = datasets.Dataset.from_dict(
        {"prompt": ["tom has 3 apples .\nAnswer:", "ann has 12 pens ."], "response": ["3", "12"]}
    )
    enc = encode_prompts(ds, tok, 32)
    # by hand: "tom has 3 apples . Answer :" is 7 tokens, "ann has 12 pens ." 5
    assert enc["prompt_length"] == [7, 5]
    for row, words, answer in zip(enc, [7, 5], ["3", "12"], strict=True):
        assert row["labels"][:words] == [IGNORE_INDEX] * words
        assert row["labels"][words:] == [tok.convert_tokens_to_ids(answer), tok.eos_token_id]
        assert row["input_ids"][words:] == row["labels"][words:]
    batch = next(iter(make_loader(enc, tok, 2)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # text columns stay out
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 2 + 2  # answer + EOS, twice
    # the model's loss is the mean cross-entropy over exactly those 4 tokens
    model = tiny_llama(tok)
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    picked = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[picked], labels[picked])
    torch.testing.assert_close(out.loss, manual)
    # too long: the prompt loses its start, never the answer
    short = encode_prompts(ds, tok, 4)
    assert short[0]["input_ids"] == tok.convert_tokens_to_ids(["Answer", ":", "3", "</s>"])
    assert short[1]["input_ids"] == tok.convert_tokens_to_ids(["pens", ".", "12", "</s>"])
    assert short["prompt_length"] == [2, 2]


@pytest.mark.parametrize(
    "prediction, gold, match",
    [
        ("5", "5.0", True),
        ("5.00", "5", True),
        ("-2.5", "-2.50", True),
        ("1,000", "1000", True),
        (" 7 \nbecause 3 + 4", "7", True),  # the first line is the answer
        ("5", "6", False),
        ("5 apples", "5", False),
        ("five", "5", False),
        ("positive", "positive", True),
        ("Positive", "positive", False),
        ("", "0", False),
    ],
)
def test_generated_answers_match_exactly_and_numbers_as_numbers(prediction, gold, match):
    assert answers_match(prediction, gold) is match


def test_parse_number():
    assert parse_number("1,234.5") == 1234.5 and parse_number("12,3") is None
    assert parse_number("nan") is None and parse_number("inf") is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_greedy_answers_equal_one_example_at_a_time_argmax(side):
    tok = word_tokenizer(side)
    model = tiny_llama(tok, seed=3)
    ds = datasets.Dataset.from_dict(
        {
            # prompts of 14, 3, 14, 7 and 14 tokens: left padding in both batches
            "prompt": [
                TEMPLATE.format(**r)
                if i % 2 == 0
                else ["how many ?", "tom has 3 apples . Answer:"][i // 2]
                for i, r in enumerate(svamp_rows(5))
            ],
            "response": ["1"] * 5,
        }
    )
    enc = encode_prompts(ds, tok, 40)
    settings = InstructionSettings(max_new_tokens=4)
    batched = generate_answers(model, enc, tok, settings, batch_size=3)
    assert enc["prompt_length"] == [14, 3, 14, 7, 14] and len(set(batched)) > 1
    for row, answer in zip(enc, batched, strict=True):
        ids = row["input_ids"][: row["prompt_length"]]
        new = []
        with torch.no_grad():
            for _ in range(4):
                step = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if step == tok.eos_token_id:
                    break
                new.append(step)
        assert answer == tok.decode(new, skip_special_tokens=True)


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    path = write_jsonl(tmp_path / "svamp.jsonl", svamp_rows(10))
    cfg = RunConfig(
        dataset=str(path),
        task="causal-lm",
        prompt_template="{Body} {Problem}",
        response_column="Answer",
    )
    with pytest.raises(
        DataError, match=r"no column\(s\) \['Problem'\].*\['ID', 'Body', 'Question', 'Answer'\]"
    ):
        load_task(RunConfig(**{**cfg.__dict__, "model_name": str(save_llama_folder(tmp_path))}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"response-column": "Answer"}, "needs a prompt-template"),
        ({"response-column": "a", "prompt-template": "{q}", "task": "auto"}, "generative tasks"),
        ({"prompt-template": "{text}", "task": "classification"}, "is for generative tasks"),
        ({"prompt-template": "no fields"}, "names no column"),
        ({"prompt-template": "{unclosed"}, "not a str.format template"),
        ({"max-new-tokens": 0}, "max-new-tokens = 0, expected >= 1"),
    ],
)
def test_instruction_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"task": "causal-lm", **overrides})


def save_llama_folder(path):
    tok = word_tokenizer()
    model = tiny_llama(tok)
    with torch.no_grad():  # a non-trivial salience ranking
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_svamp_style_data_loads_encodes_and_scores_by_generated_exact_match(tmp_path):
    cfg = RunConfig(
        model_name=str(save_llama_folder(tmp_path / "lm")),
        dataset=str(write_jsonl(tmp_path / "svamp.jsonl", svamp_rows(20))),
        task="causal-lm",
        prompt_template=TEMPLATE,
        response_column="Answer",
        partitioner="iid",
        max_new_tokens=3,
    )
    task = load_task(cfg)
    assert task.info.primary_metric == "exact-match"
    row = task.splits.test[0]
    assert row["prompt"].endswith("?\nAnswer:") and "." not in row["response"]  # 7.0 -> "7"
    enc = task.encode(task.splits.test, 40)
    model = task.load_model(0)
    metrics = evaluate_model(
        model, make_loader(enc, task.preprocessor, 8), task.info, task.preprocessor
    )
    assert {"loss", "perplexity", "accuracy", "exact-match"} <= set(metrics)
    assert metrics["num-examples"] == len(task.splits.test)
    with pytest.raises(DataError, match="needs the tokenizer"):
        evaluate_model(model, make_loader(enc, task.preprocessor, 8), task.info)


def test_polarity_prompts_are_one_template_of_this(tmp_path):
    from tests.assets import write_polarity_csv

    tok = word_tokenizer()
    ds = datasets.Dataset.from_dict({"text": ["tom has apples"], "label": [1]})
    from raffm_core.task.data import TaskInfo
    from raffm_core.task.instructions import PromptTemplate

    task = TaskInfo("causal-lm", ("0", "1"), PromptTemplate("{text} ?\nAnswer:"))
    row = encode_task(ds, tok, 16, task)[0]
    assert tok.convert_ids_to_tokens(row["input_ids"][:5]) == [
        "tom",
        "has",
        "apples",
        "?",
        "Answer",
    ]
    cfg = RunConfig(
        model_name=str(save_llama_folder(tmp_path / "lm")),  # a causal LM
        dataset=str(write_polarity_csv(tmp_path / "p.csv", 20)),
        task="causal-lm",
        prompt_template="Answer: {text}",
    )
    assert load_task(cfg).info.settings == PromptTemplate("Answer: {text}")
    with pytest.raises(DataError, match="need a {text} field"):
        load_task(RunConfig(**{**cfg.__dict__, "prompt_template": "{sentence}"}))
