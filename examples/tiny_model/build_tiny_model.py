"""Build a tiny LLaMA-3-architecture model and tokenizer, locally and without network.

    python examples/tiny_model/build_tiny_model.py --output DIR [--seed 0]

The result is a folder that `AutoTokenizer.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` load like a real Llama-3 checkpoint:

- tokenizer: byte-level BPE trained with `tokenizers` on the sample SFT data
  (examples/data), so Chinese text round-trips and common characters are single tokens.
  The Llama-3 special tokens `<|begin_of_text|>`, `<|end_of_text|>`,
  `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>` are single tokens, placed after
  the BPE vocabulary as in Llama-3. As in the base Meta-Llama-3-8B tokenizer, eos is
  `<|end_of_text|>` and there is no pad token, so the SFT script's "pad = eos" fallback runs.
- model: `LlamaForCausalLM` scaled down but keeping what makes it Llama-3: grouped-query
  attention (4 query heads, 2 key/value heads), RoPE with theta 500000, untied input and
  output embeddings, vocabulary size equal to len(tokenizer) (no resize in the SFT script).
- weights: safetensors in bfloat16, the dtype of the upstream checkpoints, so a run sees the
  same "bf16 on disk" situation a real Llama-3 user has on a Mac.

The same seed and the same library versions give byte-identical files.
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EXAMPLES_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = EXAMPLES_DIR / "data"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Size of the BPE vocabulary before the special tokens are appended. Large enough that most
# Chinese characters of the sample data become single tokens, small enough that the
# embedding matrices (trained in full through --modules_to_save) stay small.
BPE_VOCAB_SIZE = 3000

# The Llama-3 chat layout: <|begin_of_text|>, then per message a role header, a blank line,
# the content and <|eot_id|>; optionally an open assistant header for generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Words that occur once per training sample besides the record's own text (the role names in
# the chat headers and the fixed system prompt of build_dataset.py). Feeding them to the BPE
# trainer as often as they occur in training keeps prompts short under the tiny tokenizer.
TEMPLATE_TEXT = "system user assistant You are a helpful assistant. 你是一个乐于助人的助手。"

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def sample_texts(data_dir):
    """Yield the text of every record of the sample data files, in a fixed order.

    Only the data files themselves: running the example leaves token caches (with JSON files of their own) beside
    them, and the tokenizer must not depend on whether it ran.
    """
    for path in sorted([*data_dir.glob("*.json"), *data_dir.glob("sft/*.json")]):
        for record in json.loads(path.read_text(encoding="utf-8")):
            yield TEMPLATE_TEXT
            for key in ("instruction", "input", "output"):
                if record[key]:
                    yield record[key]


def build_tokenizer(data_dir):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(sample_texts(data_dir), trainer=trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    # Like Llama-3, encoding with add_special_tokens=True prepends <|begin_of_text|>.
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        # As Llama-3: no token_type_ids, which LlamaForCausalLM.forward does not accept.
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def main():
    parser = argparse.ArgumentParser(description="Build the tiny LLaMA-3-architecture demo model.")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weight initialisation")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder whose *.json SFT records train the tokenizer (default: examples/data)")
    args = parser.parse_args()

    tokenizer = build_tokenizer(args.data_dir)
    model = build_model(tokenizer, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output)
    model.save_pretrained(args.output, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama-3 model: {parameters:,} parameters, vocabulary {len(tokenizer)}, written to {args.output}")


if __name__ == "__main__":
    main()
