"""`make demo` shows the run's progress on screen: a line per logging step, the shim's lines, nothing else."""
import importlib.util

from support import REPO


def demo_module():
    spec = importlib.util.spec_from_file_location("demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What `mps-shim bash examples/sft/run_sft.sh` prints (stdout and stderr together, the bar's carriage returns read as
# line ends), from a real run on transformers 5 (values as text) and the shape transformers 4.x prints (numbers).
OUTPUT = [
    "mps-shim: TrainingArguments.bf16 True -> False (MPS runs bf16 autocast here; mps-shim runs bf16 itself)\n",
    "  0%|          | 0/3 [00:00<?, ?it/s]/site-packages/torch/utils/data/dataloader.py:759: UserWarning: pin_memory\n",
    "  warnings.warn(warn_msg)\n",
    " 33%|███▎      | 1/3 [00:03<00:07,  3.74s/it]\n",
    "{'loss': '8.055', 'grad_norm': '2.241', 'learning_rate': '0', 'memory/peak_mib': '96.09', 'epoch': '0.03774'}\n",
    " 67%|██████▋   | 2/3 [00:05<00:02,  2.51s/it]\n",
    "{'loss': 7.9, 'grad_norm': 2.0, 'learning_rate': 0.0001, 'epoch': 0.07}\n",
    "{'eval_loss': '7.95', 'eval_runtime': '1.2', 'epoch': '0.07'}\n",
    "{'train_runtime': '19.3', 'train_samples_per_second': '1.2', 'epoch': '0.1'}\n",
    "100%|██████████| 3/3 [00:19<00:00,  6.43s/it]\n",
]


def test_the_screen_gets_a_line_per_logging_step_and_the_shims_lines():
    progress = demo_module().Progress()
    shown = [line for line in map(progress.screen_line, OUTPUT) if line is not None]
    assert shown == [
        "mps-shim: TrainingArguments.bf16 True -> False (MPS runs bf16 autocast here; mps-shim runs bf16 itself)",
        "  step 1/3: loss 8.0550",
        "  step 2/3: loss 7.9000",
        "  evaluation: loss 7.9500",
        "  trained in 19 s",
    ]
