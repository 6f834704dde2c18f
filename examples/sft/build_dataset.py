"""SFT data pipeline of the example, with the data semantics of the upstream build_dataset.py.

Written for mps-shim from a description of the upstream data loader (its code is not copied);
it keeps the upstream behaviour on purpose, quirks included, because the shim is tested against it:

- each file is a JSON array (or JSON lines) of {"instruction", "input", "output"} records;
  a non-empty `input` is appended to the instruction after a newline;
- the prompt is the Llama-3 chat layout with a fixed bilingual system prompt, written out by hand
  (not `apply_chat_template`) and tokenized without special tokens, so there is no
  <|begin_of_text|>; the response ends with <|eot_id|>;
- prompt tokens get the label -100, so the loss covers only the response;
- prompt + response is cut on the right at max_seq_length: a prompt that fills max_seq_length
  leaves a sample whose labels are all -100;
- the tokenized data is cached next to each data file in `<stem>_<max_seq_length>/` and reused
  whenever that folder loads, whatever changed since (tokenizer, template, file content).
"""

import logging
import os

import datasets
import torch
from datasets import concatenate_datasets, load_dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"
SYSTEM_FORMAT = "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>"
USER_FORMAT = (
    "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
ASSISTANT_FORMAT = "{content}<|eot_id|>"


def format_prompt(instruction, input_text):
    """The text the model is given: system prompt, user turn, open assistant header."""
    if input_text:
        instruction = f"{instruction}\n{input_text}"
    return SYSTEM_FORMAT.format(content=DEFAULT_SYSTEM_PROMPT) + USER_FORMAT.format(content=instruction)


def format_response(output):
    """The text the model learns to produce, terminated so that it learns to stop."""
    return ASSISTANT_FORMAT.format(content=output)


def cache_path_for(data_file, max_seq_length, data_cache_dir=None):
    """Where the tokenized copy of data_file is kept: the key is only file stem + max_seq_length."""
    cache_root = data_cache_dir if data_cache_dir is not None else os.path.dirname(data_file)
    stem = os.path.basename(data_file).split(".")[0]
    return os.path.join(cache_root, f"{stem}_{max_seq_length}")


def build_instruction_dataset(data_path, tokenizer, max_seq_length, data_cache_dir=None,
                              preprocessing_num_workers=None):
    """Tokenize one file or a list of files into a single dataset of input_ids and labels."""

    def tokenize_records(batch):
        prompts = [format_prompt(instruction, input_text)
                   for instruction, input_text in zip(batch["instruction"], batch["input"])]
        responses = [format_response(output) for output in batch["output"]]
        prompt_ids = tokenizer(prompts, return_attention_mask=False, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, return_attention_mask=False, add_special_tokens=False)["input_ids"]
        all_input_ids, all_labels = [], []
        for prompt, response in zip(prompt_ids, response_ids):
            all_input_ids.append(torch.LongTensor(prompt + response)[:max_seq_length])
            all_labels.append(torch.LongTensor([IGNORE_INDEX] * len(prompt) + response)[:max_seq_length])
        return {"input_ids": all_input_ids, "labels": all_labels}

    logger.warning("building dataset...")
    data_files = data_path if isinstance(data_path, (list, tuple)) else [data_path]
    per_file_datasets = []
    for data_file in data_files:
        cache_path = cache_path_for(data_file, max_seq_length, data_cache_dir)
        os.makedirs(cache_path, exist_ok=True)
        try:
            processed = datasets.load_from_disk(cache_path)
            logger.info(f"tokenized {data_file} loaded from the cache {cache_path}")
        except Exception:
            # Any failure to load the cache (first run, partial write, other datasets version)
            # means: tokenize again and write the cache.
            raw = load_dataset("json", data_files=data_file, cache_dir=cache_path)
            processed = raw.map(
                tokenize_records,
                batched=True,
                num_proc=preprocessing_num_workers,
                remove_columns=["instruction", "input", "output"],
                keep_in_memory=False,
                desc="tokenizing SFT records",
            )
            processed.save_to_disk(cache_path)
        processed.set_format("torch")
        per_file_datasets.append(processed["train"])
    return concatenate_datasets(per_file_datasets)
