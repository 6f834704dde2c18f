#!/bin/sh
# LoRA instruction fine-tuning of the tiny Llama-3 demo model: mps-shim's stand-in for the
# upstream Chinese-LLaMA-Alpaca-3 scripts/training/run_sft.sh, with the same launcher and flags
# (--bf16, --torch_dtype bfloat16, --evaluation_strategy, --ddp_*, ...) and values scaled down
# for a 1.7M-parameter model. Those flags are CUDA habits the shim has to handle on a Mac.
#
# Build the model first:  python examples/tiny_model/build_tiny_model.py --output examples/tiny_model/llama3-tiny
# Then:                   bash examples/sft/run_sft.sh      (or sh, or: mps-shim bash examples/sft/run_sft.sh)
#
# Every variable below can be set from the environment, e.g. MAX_STEPS=5 OUTPUT_DIR=/tmp/out sh run_sft.sh.
# Paths are resolved from this file's folder, so the script runs from any working directory.
# The tokenized data is cached next to each data file (<stem>_<max_seq_length>/), as upstream.

here=$(cd "$(dirname "$0")" && pwd)

lr=${LR:-1e-3}
lora_rank=${LORA_RANK:-8}
lora_alpha=${LORA_ALPHA:-16}
lora_trainable=${LORA_TRAINABLE:-"q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"}
modules_to_save=${MODULES_TO_SAVE:-"embed_tokens,lm_head"}
lora_dropout=${LORA_DROPOUT:-0.05}

pretrained_model=${PRETRAINED_MODEL:-"${here}/../tiny_model/llama3-tiny"}
tokenizer_name_or_path=${TOKENIZER_NAME_OR_PATH:-"${pretrained_model}"}
dataset_dir=${DATASET_DIR:-"${here}/../data/sft"}
validation_file=${VALIDATION_FILE:-"${here}/../data/validation.json"}
per_device_train_batch_size=${PER_DEVICE_TRAIN_BATCH_SIZE:-4}
per_device_eval_batch_size=${PER_DEVICE_EVAL_BATCH_SIZE:-4}
gradient_accumulation_steps=${GRADIENT_ACCUMULATION_STEPS:-2}
max_seq_length=${MAX_SEQ_LENGTH:-256}
output_dir=${OUTPUT_DIR:-"${here}/output_dir"}
num_train_epochs=${NUM_TRAIN_EPOCHS:-2}
# -1 is transformers' "no limit": the run length comes from num_train_epochs (about 54 steps).
max_steps=${MAX_STEPS:--1}
logging_steps=${LOGGING_STEPS:-1}
eval_steps=${EVAL_STEPS:-10}
save_steps=${SAVE_STEPS:-20}
preprocessing_num_workers=${PREPROCESSING_NUM_WORKERS:-2}
# Upstream passes $RANDOM, which is empty under sh/dash ("argument --seed: expected one argument").
seed=${SEED:-${RANDOM:-42}}

torchrun --nnodes 1 --nproc_per_node 1 "${here}/run_clm_sft_with_peft.py" \
    --model_name_or_path "${pretrained_model}" \
    --tokenizer_name_or_path "${tokenizer_name_or_path}" \
    --dataset_dir "${dataset_dir}" \
    --per_device_train_batch_size "${per_device_train_batch_size}" \
    --per_device_eval_batch_size "${per_device_eval_batch_size}" \
    --do_train \
    --low_cpu_mem_usage \
    --do_eval \
    --seed "${seed}" \
    --bf16 \
    --num_train_epochs "${num_train_epochs}" \
    --max_steps "${max_steps}" \
    --lr_scheduler_type cosine \
    --learning_rate "${lr}" \
    --warmup_ratio 0.03 \
    --logging_strategy steps \
    --logging_steps "${logging_steps}" \
    --save_strategy steps \
    --save_total_limit 3 \
    --evaluation_strategy steps \
    --eval_steps "${eval_steps}" \
    --save_steps "${save_steps}" \
    --gradient_accumulation_steps "${gradient_accumulation_steps}" \
    --preprocessing_num_workers "${preprocessing_num_workers}" \
    --max_seq_length "${max_seq_length}" \
    --output_dir "${output_dir}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --lora_rank "${lora_rank}" \
    --lora_alpha "${lora_alpha}" \
    --trainable "${lora_trainable}" \
    --lora_dropout "${lora_dropout}" \
    --modules_to_save "${modules_to_save}" \
    --torch_dtype bfloat16 \
    --validation_file "${validation_file}" \
    --load_in_kbits 16 \
    --ddp_find_unused_parameters False
