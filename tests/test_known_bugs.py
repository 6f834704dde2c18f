"""Known silent wrong-result bugs of MPS, by torch release: said at the start of a run and by doctor; the padding
side that avoids the fully-masked-row NaN."""
from __future__ import annotations

import json

import pytest

from support import MPS_SHIM, clean_env, run

from mps_shim.known_bugs import KNOWN_BUGS, affecting, warning_line
from mps_shim.padding import training_padding_side


def keys(torch_version):
    return [bug.key for bug in affecting(torch_version)]


def test_each_release_gets_its_bugs():
    assert keys("2.2.2") == ["sdpa_fully_masked_rows", "addcdiv_noncontiguous", "backward_large_after_shape_change"]
    assert keys("2.8.0") == ["sdpa_fully_masked_rows", "sdpa_vector_noncontiguous", "backward_large_after_shape_change"]
    assert keys("2.9.1") == ["sdpa_vector_noncontiguous", "backward_large_after_shape_change"]
    assert keys("2.13.0+cpu") == ["backward_large_after_shape_change"]
    for bug in KNOWN_BUGS:
        assert bug.source.startswith("pytorch/pytorch#") and bug.range_from and bug.trigger


def test_the_start_of_a_run_says_them_in_one_line(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("import torch\n")
    lines = run([MPS_SHIM, "--simulate", "macos=14.5,torch=2.6", script]).stderr.splitlines()
    said = [line for line in lines if line.startswith("mps-shim: known silent wrong results")]
    assert said == [f"mps-shim: {warning_line('2.6')}"]
    assert "NaN attention for fully masked rows (pytorch/pytorch#156707" in said[0]
    newer = run([MPS_SHIM, "--simulate", "macos=14.5,torch=2.9", script]).stderr
    assert "NaN attention" not in newer and "known silent wrong results of torch 2.9" in newer
    off_mac = run([MPS_SHIM, script]).stderr
    assert "known silent wrong results" not in off_mac


def test_doctor_names_them():
    findings = json.loads(
        run([MPS_SHIM, "--simulate", "macos=14.5,torch=2.3", "doctor", "--json"], check=True).stdout
    )
    assert [bug["key"] for bug in findings["known_bugs"]] == keys("2.3")
    assert findings["known_bugs"][1]["releases"] == "2.2-2.3"
    text = run([MPS_SHIM, "--simulate", "macos=14.5,torch=2.3", "doctor"], check=True).stdout
    assert warning_line("2.3") in text.splitlines()
    plain = json.loads(run([MPS_SHIM, "doctor", "--json"], check=True).stdout)
    assert plain["known_bugs"] == []  # no Apple GPU here


def test_the_padding_side_decision():
    assert training_padding_side("left", "2.8.0", is_mps=True) == "right"
    assert training_padding_side("right", "2.8.0", is_mps=True) is None
    assert training_padding_side("left", "2.9.0", is_mps=True) is None  # fixed
    assert training_padding_side("left", "2.8.0", is_mps=False) is None


RECORD_MASKS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa", torch_dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
masks = []
original = torch.nn.functional.scaled_dot_product_attention

def record(*args, **kwargs):
    masks.append(kwargs.get("attn_mask"))
    return original(*args, **kwargs)

torch.nn.functional.scaled_dot_product_attention = record
found = {}
for side in ("left", "right"):
    tokenizer.padding_side = side
    batch = tokenizer(["a b c d e f g h", "a"], return_tensors="pt", padding=True)
    masks.clear()
    out = model(**batch)
    mask = masks[0]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    found[side] = int((~allowed.any(dim=-1)).sum())  # query rows with no key to attend to
print(json.dumps(found))
"""


def test_left_padding_gives_fully_masked_rows_and_right_padding_none(tiny_model_dir):
    # What transformers' LLaMA really hands to SDPA for a padded batch: the trigger of the MPS NaN is left padding.
    import sys

    result = run([sys.executable, "-c", RECORD_MASKS, tiny_model_dir], env=clean_env(), check=True)
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["right"] == 0
    assert found["left"] > 0


@pytest.mark.parametrize("release, changed", [("2.8", True), ("2.9", False)])
def test_a_left_padding_tokenizer_pads_right_for_training_where_the_bug_applies(tiny_model_dir, release, changed):
    code = (
        "import json, sys\n"
        "import mps_shim\n"
        f"mps_shim.activate(simulate='macos=14.5,torch={release}')\n"
        "from transformers import AutoTokenizer\n"
        "from mps_shim.padding import pad_right_for_training\n"
        "from mps_shim.runtime import current\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], padding_side='left')\n"
        "print(json.dumps([pad_right_for_training(tokenizer, current()), tokenizer.padding_side,\n"
        "                  [c['target'] for c in mps_shim.report()['changes']]]))\n"
    )
    import sys

    result = run([sys.executable, "-c", code, tiny_model_dir], env=clean_env(MPS_SHIM_LOG_LEVEL="quiet"), check=True)
    did, side, targets = json.loads(result.stdout.splitlines()[-1])
    assert (did, side) == ((True, "right") if changed else (False, "left"))
    assert ("tokenizer.padding_side" in targets) is changed


# A script under the simulated torch 2.7 (affected) with a left-padding tokenizer and the tiny model loaded; argv[1]
# is the model folder, argv[2] the output folder.
LEFT_PADDED_TORCH_2_7 = (
    "import json, sys\n"
    "import mps_shim\n"
    "mps_shim.activate(simulate='macos=14.5,torch=2.7')\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, "
    "TrainingArguments\n"
    "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], padding_side='left')\n"
    "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "collator = DataCollatorForSeq2Seq(tokenizer=tokenizer)\n"
)


def last_json_of(code: str, tiny_model_dir, tmp_path):
    import sys

    result = run([sys.executable, "-c", code, tiny_model_dir, tmp_path / "out"],
                 env=clean_env(MPS_SHIM_LOG_LEVEL="quiet"), check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_a_trainer_with_a_left_padding_collator_is_padded_right(tiny_model_dir, tmp_path):
    # What the Trainer patch calls before training: the collator's tokenizer (DataCollatorForSeq2Seq, as the example).
    code = LEFT_PADDED_TORCH_2_7 + (
        "from mps_shim.padding import pad_trainer_right\n"
        "from mps_shim.runtime import current\n"
        "trainer = Trainer(model=model, args=TrainingArguments(sys.argv[2], report_to=[]), data_collator=collator)\n"
        "changed = pad_trainer_right(trainer, current())\n"
        "batch = collator([{'input_ids': [5, 6, 7], 'labels': [5, 6, 7]}, {'input_ids': [5], 'labels': [5]}])\n"
        "print(json.dumps([changed, batch['attention_mask'].tolist(), batch['labels'].tolist()]))\n"
    )
    changed, mask, labels = last_json_of(code, tiny_model_dir, tmp_path)
    assert changed is True
    assert mask == [[1, 1, 1], [1, 0, 0]] and labels[1] == [5, -100, -100]  # padded on the right


def test_training_on_an_affected_torch_pads_the_collator_right_before_the_first_step(tiny_model_dir, tmp_path):
    # The Trainer patch makes that call itself: a left-padding collator under torch 2.7 trains right-padded.
    code = LEFT_PADDED_TORCH_2_7 + (
        "data = [{'input_ids': [5, 6, 7, 8][:n], 'labels': [5, 6, 7, 8][:n]} for n in (1, 4, 2, 3)]\n"
        "args = TrainingArguments(sys.argv[2], report_to=[], max_steps=1, per_device_train_batch_size=4)\n"
        "Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()\n"
        "print(json.dumps([tokenizer.padding_side, [c['target'] for c in mps_shim.report()['changes']]]))\n"
    )
    side, targets = last_json_of(code, tiny_model_dir, tmp_path)
    assert side == "right" and "tokenizer.padding_side" in targets
