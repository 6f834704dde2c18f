"""The tiny Llama-3 model of the example: deterministic, Llama-3 shaped, with a usable tokenizer."""

import hashlib
import json

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_model

LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>"]


def file_hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def rope_theta(config):
    # transformers 4.x keeps rope_theta on the config; 5.x moved it into config.rope_parameters.
    parameters = getattr(config, "rope_parameters", None)
    return parameters["rope_theta"] if parameters else config.rope_theta


def test_same_seed_gives_identical_files(tiny_model_dir, tmp_path):
    second_build = build_tiny_model(tmp_path / "again", seed=0)
    assert file_hashes(second_build) == file_hashes(tiny_model_dir)


def test_other_seed_changes_only_the_weights(tiny_model_dir, tmp_path):
    other = file_hashes(build_tiny_model(tmp_path / "seed1", seed=1))
    reference = file_hashes(tiny_model_dir)
    changed = {name for name in reference if other[name] != reference[name]}
    assert changed == {"model.safetensors"}


def test_config_keeps_the_llama3_architecture(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert rope_theta(config) == 500000.0
    assert config.tie_word_embeddings is False
    assert config.vocab_size == len(tokenizer)  # so the SFT script does not resize embeddings
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|end_of_text|>")


def test_weights_are_bf16_safetensors_with_untied_embeddings(tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        dtypes = {weights.get_tensor(name).dtype for name in names}
        embeddings = weights.get_tensor("model.embed_tokens.weight")
        lm_head = weights.get_tensor("lm_head.weight")
    assert dtypes == {torch.bfloat16}
    assert not torch.equal(embeddings, lm_head)


def test_special_tokens_are_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in LLAMA3_SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token is None  # like base Llama-3: the SFT script falls back to eos


def test_chinese_sample_data_round_trips(tiny_model_dir, sample_sft_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = json.loads((sample_sft_dir / "tasks_with_input.json").read_text(encoding="utf-8"))
    for record in records[:40]:
        text = f"{record['instruction']}\n{record['input']}\n{record['output']}"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # A BPE trained on this data needs far fewer tokens than UTF-8 bytes.
        assert len(ids) < len(text.encode("utf-8")) / 2


def test_chat_template_renders_the_llama3_layout(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是助手。<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_model_loads_and_predicts_near_uniform(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    batch = tokenizer(["为什么天空是蓝色的？"], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    # An untrained model is close to uniform over the vocabulary: loss ~ ln(vocab size).
    uniform_loss = torch.log(torch.tensor(float(len(tokenizer))))
    assert abs(loss - uniform_loss) < 0.5
