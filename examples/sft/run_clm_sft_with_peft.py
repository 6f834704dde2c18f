"""Instruction fine-tuning (SFT) of a causal LM with LoRA: mps-shim's stand-in for the upstream
Chinese-LLaMA-Alpaca-3 `scripts/training/run_clm_sft_with_peft.py`.

Written for mps-shim from a description of the upstream script (Apache-2.0; its code is not copied). It keeps the upstream's
command-line surface (same argument names, types and defaults) and the upstream's CUDA habits
on purpose: `device_map={"": LOCAL_RANK}`, bf16 from the command line, bitsandbytes for 4/8 bits,
flash-attention on request, `Trainer(tokenizer=...)`. Those are what break on a Mac, and this
file is what the shim is tested against, so do not "fix" them here; the shim fixes them.

Run it through run_sft.sh, or directly:
    python run_clm_sft_with_peft.py --model_name_or_path DIR --dataset_dir DIR ... --output_dir DIR
    python run_clm_sft_with_peft.py all_arguments.json
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
from build_dataset import build_instruction_dataset
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

# Same import as upstream. transformers 5 removed send_example_telemetry, so on a current stack
# this line raises ImportError; restoring it is the shim's job, not this example's.
from transformers.utils import check_min_version, send_example_telemetry
from transformers.utils.versions import require_version

check_min_version("4.40.0")
require_version("datasets>=1.8.0", "To fix: pip install 'datasets>=1.8.0'")

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune, and how to load them."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Checkpoint to start from (a local folder here). Leave unset to train from scratch."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer to use when --tokenizer_name is not given."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "When training from scratch, override config values, e.g. "
                          "n_embd=10,resid_pdrop=0.2. Not allowed with --config_name or --model_name_or_path."},
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or path, if not the same as the model."}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as the model."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to keep downloaded models and configs."}
    )
    use_fast_tokenizer: bool = field(
        default=False, metadata={"help": "Use a tokenizers-backed (fast) tokenizer when there is one."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version: branch, tag or commit."}
    )
    use_auth_token: bool = field(
        default=False, metadata={"help": "Send the token from `huggingface-cli login` (for private models)."}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype to load the weights in; 'auto' takes it from the checkpoint.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    low_cpu_mem_usage: bool = field(
        default=False, metadata={"help": "Build the model empty and load the weights into it (needed with a device_map)."}
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError("--config_overrides can't be used in combination with --config_name or --model_name_or_path")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on. Several fields are accepted but unused, as upstream."""

    dataset_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder whose *.json files are the training data."}
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Accepted, not used by SFT."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "JSON file of evaluation records (needed with --do_eval)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Accepted, not used: the tokenized cache is reused whenever it loads."}
    )
    validation_split_percentage: Optional[float] = field(
        default=0.05, metadata={"help": "Accepted, not used by SFT."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes used to tokenize the data."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Accepted, not used by SFT."})
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Accepted, not used: the cache always goes next to each data file."}
    )
    max_seq_length: Optional[int] = field(default=1024)


@dataclass
class MyTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the LoRA and quantisation settings of the upstream script."""

    trainable: Optional[str] = field(default="q_proj,v_proj")
    lora_rank: Optional[int] = field(default=8)
    lora_dropout: Optional[float] = field(default=0.1)
    lora_alpha: Optional[float] = field(default=32.)
    modules_to_save: Optional[str] = field(default=None)
    peft_path: Optional[str] = field(default=None)
    use_flash_attention_2: Optional[bool] = field(default=False)
    double_quant: Optional[bool] = field(default=True)
    quant_type: Optional[str] = field(default="nf4")
    load_in_kbits: Optional[int] = field(default=16)
    full_finetuning: Optional[bool] = field(default=False)


def parse_arguments():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MyTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def setup_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # training_args.log_level defaults to "passive"; log at info like the upstream script.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def find_last_checkpoint(training_args):
    """The checkpoint to resume from, or None; refuse to train over a non-empty output_dir."""
    if not (os.path.isdir(training_args.output_dir) and training_args.do_train
            and not training_args.overwrite_output_dir):
        return None
    last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is None and len(os.listdir(training_args.output_dir)) > 0:
        raise ValueError(f"Output directory ({training_args.output_dir}) already exists and is not empty. "
                         "Use --overwrite_output_dir to overcome.")
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}. To avoid this behavior, "
                    "change the `--output_dir` or add `--overwrite_output_dir` to train from scratch.")
    return last_checkpoint


def load_config(model_args):
    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "use_auth_token": True if model_args.use_auth_token else None,
    }
    if model_args.config_name:
        return AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    if model_args.model_name_or_path:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    # As upstream: ModelArguments has no model_type, so training from scratch raises AttributeError here.
    config = CONFIG_MAPPING[model_args.model_type]()
    logger.warning("You are instantiating a new config instance from scratch.")
    if model_args.config_overrides is not None:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        config.update_from_string(model_args.config_overrides)
        logger.info(f"New config: {config}")
    return config


def load_tokenizer(model_args):
    tokenizer_kwargs = {
        "cache_dir": model_args.cache_dir,
        "use_fast": model_args.use_fast_tokenizer,
        "revision": model_args.model_revision,
        "use_auth_token": True if model_args.use_auth_token else None,
    }
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **tokenizer_kwargs)
    elif model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path, **tokenizer_kwargs)
    else:
        raise ValueError("Instantiating a new tokenizer from scratch is not supported by this script. "
                         "Pass --tokenizer_name or --tokenizer_name_or_path.")
    # Llama-3 base checkpoints have no pad token; padded labels are -100, so eos is a safe pad.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_datasets(data_args, training_args, tokenizer):
    train_dataset, eval_dataset = None, None
    if training_args.do_train:
        with training_args.main_process_first(desc="loading and tokenization"):
            files = [str(path) for path in Path(data_args.dataset_dir).glob("*.json")]
            logger.info(f"Training files: {' '.join(files)}")
            train_dataset = build_instruction_dataset(
                data_path=files,
                tokenizer=tokenizer,
                max_seq_length=data_args.max_seq_length,
                data_cache_dir=None,
                preprocessing_num_workers=data_args.preprocessing_num_workers,
            )
        logger.info(f"Num train_samples  {len(train_dataset)}")
        logger.info("Training example:")
        logger.info(tokenizer.decode(train_dataset[0]["input_ids"]))
    if training_args.do_eval:
        with training_args.main_process_first(desc="loading and tokenization"):
            files = [data_args.validation_file]
            logger.info(f"Evaluation files: {' '.join(files)}")
            eval_dataset = build_instruction_dataset(
                data_path=files,
                tokenizer=tokenizer,
                max_seq_length=data_args.max_seq_length,
                data_cache_dir=None,
                preprocessing_num_workers=data_args.preprocessing_num_workers,
            )
        logger.info(f"Num eval_samples  {len(eval_dataset)}")
        logger.info("Evaluation example:")
        logger.info(tokenizer.decode(eval_dataset[0]["input_ids"]))
    return train_dataset, eval_dataset


def load_model(model_args, training_args, config, tokenizer):
    """Load the base model the way the upstream does, with its CUDA assumptions, then wrap it in PEFT."""
    if model_args.torch_dtype in ["auto", None]:
        torch_dtype = model_args.torch_dtype
    else:
        torch_dtype = getattr(torch, model_args.torch_dtype)
    compute_dtype = (torch.float16 if training_args.fp16
                     else (torch.bfloat16 if training_args.bf16 else torch.float32))
    if training_args.load_in_kbits in [4, 8]:
        skip_modules = training_args.modules_to_save.split(",") if training_args.modules_to_save is not None else None
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=training_args.load_in_kbits == 4,
            load_in_8bit=training_args.load_in_kbits == 8,
            llm_int8_threshold=6.0,
            load_in_8bit_skip_modules=skip_modules,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=training_args.double_quant,
            bnb_4bit_quant_type=training_args.quant_type,
        )
        logger.info(f"Quantization config: {quantization_config.to_dict()}")
    else:
        quantization_config = None
    # One process per GPU under torchrun: put the whole model on this process's GPU. An integer
    # device means a CUDA device to the libraries of the upstream's era, hence no Mac support.
    device_map = {"": int(os.environ.get("LOCAL_RANK") or 0)}
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        use_auth_token=True if model_args.use_auth_token else None,
        torch_dtype=torch_dtype,
        low_cpu_mem_usage=model_args.low_cpu_mem_usage,
        device_map=device_map,
        quantization_config=quantization_config,
        attn_implementation="flash_attention_2" if training_args.use_flash_attention_2 else "sdpa",
    )
    if training_args.load_in_kbits in [4, 8]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    model.config.use_cache = False

    model_vocab_size = model.get_input_embeddings().weight.shape[0]
    logger.info(f"Model vocab size: {model_vocab_size}")
    logger.info(f"len(tokenizer):{len(tokenizer)}")
    if model_vocab_size != len(tokenizer):
        logger.info(f"Resize model vocab size to {len(tokenizer)}")
        model.resize_token_embeddings(len(tokenizer))

    # --full_finetuning trains every parameter of the base model; otherwise LoRA via PEFT.
    if not training_args.full_finetuning:
        if training_args.peft_path is not None:
            logger.info("Peft from pre-trained model")
            model = PeftModel.from_pretrained(model, training_args.peft_path, device_map=device_map, is_trainable=True)
        else:
            logger.info("Init new peft model")
            target_modules = training_args.trainable.split(",")
            modules_to_save = training_args.modules_to_save
            if modules_to_save is not None:
                modules_to_save = modules_to_save.split(",")
            logger.info(f"target_modules: {target_modules}")
            logger.info(f"lora_rank: {training_args.lora_rank}")
            peft_config = LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                target_modules=target_modules,
                inference_mode=False,
                r=training_args.lora_rank,
                lora_alpha=training_args.lora_alpha,
                lora_dropout=training_args.lora_dropout,
                modules_to_save=modules_to_save,
            )
            model = get_peft_model(model, peft_config)
        model.print_trainable_parameters()
    return model


def main():
    model_args, data_args, training_args = parse_arguments()

    # Example usage telemetry of transformers, called as upstream does; it sends nothing when
    # offline (HF_HUB_OFFLINE / HF_HUB_DISABLE_TELEMETRY).
    send_example_telemetry("run_clm", model_args, data_args)

    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.local_rank}, device: {training_args.device}, n_gpu: {training_args.n_gpu}"
        + f" distributed training: {bool(training_args.local_rank != -1)}, "
          f"16-bits training: {training_args.fp16 or training_args.bf16}"
    )
    last_checkpoint = find_last_checkpoint(training_args)
    set_seed(training_args.seed)

    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args)
    data_collator = DataCollatorForSeq2Seq(tokenizer=tokenizer)
    train_dataset, eval_dataset = load_datasets(data_args, training_args, tokenizer)
    model = load_model(model_args, training_args, config, tokenizer)

    # tokenizer= is the upstream's keyword; transformers 5 only accepts processing_class=.
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=data_collator,
    )

    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None:
            checkpoint = training_args.resume_from_checkpoint
        elif last_checkpoint is not None:
            checkpoint = last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()

        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
