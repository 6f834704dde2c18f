"""The example's data pipeline on the real sample records and the real tiny tokenizer:
Llama-3 template with the fixed system prompt, prompt masking, right truncation, per-file cache."""

import json
import sys

import pytest
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from conftest import EXAMPLE_SFT_DIR

sys.path.insert(0, str(EXAMPLE_SFT_DIR))
import build_dataset  # noqa: E402  (the example's sibling module, imported as its script does)

MAX_SEQ_LENGTH = 256  # what run_sft.sh passes
SYSTEM_HEADER = ("<|start_header_id|>system<|end_header_id|>\n\n"
                 "You are a helpful assistant. 你是一个乐于助人的助手。<|eot_id|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # what the SFT script does for a tokenizer without pad
    return tokenizer


def write_records(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def load_records(path):
    return json.loads(path.read_text(encoding="utf-8"))


def token_count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def first_record(records, predicate):
    return next(record for record in records if predicate(record))


def build_one(tmp_path, tokenizer, record, max_seq_length=MAX_SEQ_LENGTH):
    data_file = write_records(tmp_path / "one.json", [record])
    return build_dataset.build_instruction_dataset([data_file], tokenizer, max_seq_length)[0]


def test_record_with_input_is_templated_and_masked(tmp_path, tokenizer, sample_sft_dir):
    record = first_record(load_records(sample_sft_dir / "tasks_with_input.json"), lambda r: len(r["output"]) < 60)
    sample = build_one(tmp_path, tokenizer, record)
    input_ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()

    expected_prompt = (SYSTEM_HEADER
                       + f"<|start_header_id|>user<|end_header_id|>\n\n{record['instruction']}\n{record['input']}<|eot_id|>"
                       + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    prompt_length = token_count(tokenizer, expected_prompt)
    assert tokenizer.decode(input_ids) == expected_prompt + record["output"] + "<|eot_id|>"
    assert input_ids[0] != tokenizer.bos_token_id  # upstream tokenizes without <|begin_of_text|>
    assert labels[:prompt_length] == [-100] * prompt_length
    assert labels[prompt_length:] == input_ids[prompt_length:]
    assert labels[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_record_without_input_has_no_extra_newline(tmp_path, tokenizer, sample_sft_dir):
    record = first_record(load_records(sample_sft_dir / "general_instructions.json"), lambda r: not r["input"])
    text = tokenizer.decode(build_one(tmp_path, tokenizer, record)["input_ids"])
    assert f"<|end_header_id|>\n\n{record['instruction']}<|eot_id|>" in text


def test_sample_data_has_records_longer_than_max_seq_length(tokenizer, sample_sft_dir):
    records = load_records(sample_sft_dir / "general_instructions.json") + load_records(
        sample_sft_dir / "tasks_with_input.json")
    long_prompts = [r for r in records
                    if token_count(tokenizer, build_dataset.format_prompt(r["instruction"], r["input"])) >= MAX_SEQ_LENGTH]
    long_responses = [r for r in records if token_count(tokenizer, r["output"]) > MAX_SEQ_LENGTH]
    assert len(records) >= 200
    assert long_prompts and long_responses


def test_long_response_is_cut_on_the_right(tmp_path, tokenizer, sample_sft_dir):
    record = first_record(load_records(sample_sft_dir / "general_instructions.json"),
                          lambda r: token_count(tokenizer, r["output"]) > MAX_SEQ_LENGTH)
    sample = build_one(tmp_path, tokenizer, record)
    input_ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert len(input_ids) == len(labels) == MAX_SEQ_LENGTH
    assert tokenizer.decode(input_ids).startswith(SYSTEM_HEADER)  # the left end is kept
    assert labels[-1] != tokenizer.convert_tokens_to_ids("<|eot_id|>")  # the terminator is lost


def test_prompt_longer_than_max_seq_length_leaves_no_label(tmp_path, tokenizer, sample_sft_dir):
    record = first_record(
        load_records(sample_sft_dir / "tasks_with_input.json"),
        lambda r: token_count(tokenizer, build_dataset.format_prompt(r["instruction"], r["input"])) >= MAX_SEQ_LENGTH)
    labels = build_one(tmp_path, tokenizer, record)["labels"].tolist()
    assert labels == [-100] * MAX_SEQ_LENGTH  # the upstream's NaN/zero-loss sample (issue #29)


def test_cache_goes_next_to_each_file_and_is_reused_even_when_stale(tmp_path, tokenizer, sample_sft_dir):
    records = load_records(sample_sft_dir / "general_instructions.json")[:3]
    data_file = write_records(tmp_path / "qa.v1.json", records)
    first = build_dataset.build_instruction_dataset([data_file], tokenizer, 64)
    assert (tmp_path / "qa_64").is_dir()  # key: first dot-segment of the name + max_seq_length

    write_records(tmp_path / "qa.v1.json", records[:1])  # edit the file: the cache does not notice
    second = build_dataset.build_instruction_dataset([data_file], tokenizer, 64)
    assert len(second) == len(first) == 3


def test_files_are_concatenated(tmp_path, tokenizer, sample_sft_dir):
    records = load_records(sample_sft_dir / "general_instructions.json")
    files = [write_records(tmp_path / "a.json", records[:4]), write_records(tmp_path / "b.json", records[4:9])]
    assert len(build_dataset.build_instruction_dataset(files, tokenizer, MAX_SEQ_LENGTH)) == 9


def test_collator_pads_labels_with_ignore_index(tmp_path, tokenizer, sample_sft_dir):
    records = load_records(sample_sft_dir / "tasks_with_input.json")[:4]
    dataset = build_dataset.build_instruction_dataset(
        [write_records(tmp_path / "four.json", records)], tokenizer, MAX_SEQ_LENGTH)
    lengths = [len(sample["input_ids"]) for sample in dataset]
    batch = DataCollatorForSeq2Seq(tokenizer=tokenizer)([dataset[i] for i in range(len(dataset))])
    shortest = lengths.index(min(lengths))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(lengths))
    assert batch["labels"][shortest, min(lengths):].eq(-100).all()
    assert batch["input_ids"][shortest, min(lengths):].eq(tokenizer.eos_token_id).all()
    assert batch["attention_mask"][shortest].sum() == min(lengths)
