#!/bin/bash
# Self-check for a real Apple-silicon Mac, in one command: what only a Mac can verify about mps-shim.
#
#     bash examples/mac-selfcheck.sh            (from a clone of mps-shim; needs python3 and the network for pip)
#
# It makes its own virtual environment (mps-shim with its tested stack, plus datasets and matplotlib for the demo),
# then checks, each as one PASS/FAIL line:
#   1. MPS is really there (with the reason when it is not, e.g. torch >= 2.9 on macOS 13);
#   2. doctor's live probes (bf16 tensor, autocast per dtype, the recommended working set) against the table;
#   3. MPS numerics: a few forward/backward passes of the tiny Llama-3 in fp32 on MPS against the CPU;
#   4. a real MPS out-of-memory at a forced small budget is recognised by the shim's classifier;
#   5. a short real training run of the example under the shim, whose report must say a real (not simulated) mps;
#   6. the same run at a forced small budget: the batch is split or recovered, the effective batch kept;
#   7. the watermark variables set at start-up, and the torch-imported-first path (budget as a memory fraction).
# Everything goes into ONE file to attach to a bug report: mps-shim-selfcheck-<date>.txt (in SELFCHECK_DIR or here).
# Nothing is uploaded anywhere. SELFCHECK_PYTHON=path/to/python reuses an environment instead of making one.
set -u
unset MPS_SHIM_SIMULATE MPS_SHIM_MEMORY_LIMIT MPS_SHIM_PRECISION MPS_SHIM_REPORT MPS_SHIM_PLAN_ONLY MPS_SHIM
unset PYTORCH_MPS_HIGH_WATERMARK_RATIO PYTORCH_MPS_LOW_WATERMARK_RATIO PYTORCH_ENABLE_MPS_FALLBACK

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "${here}/.." && pwd)
stamp=$(date +%Y%m%d-%H%M%S)
result_file="${SELFCHECK_DIR:-$PWD}/mps-shim-selfcheck-${stamp}.txt"
work_dir=$(mktemp -d "${TMPDIR:-/tmp}/mps-shim-selfcheck.XXXXXX")
failures=0

say() { echo "$1" | tee -a "${result_file}"; }
section() { printf '\n===== %s =====\n' "$1" >> "${result_file}"; }
verdict() {  # verdict NAME STATUS DETAIL
    if [ "$2" -eq 0 ]; then say "PASS $1"; else say "FAIL $1: $3"; failures=$((failures + 1)); fi
}

: > "${result_file}"
say "mps-shim self-check, writing ${result_file}"
section "machine"
{ uname -a; sw_vers 2>/dev/null; sysctl -n machdep.cpu.brand_string hw.memsize 2>/dev/null; pmset -g batt 2>/dev/null; } \
    >> "${result_file}" 2>&1
if [ "$(uname -s)/$(uname -m)" != "Darwin/arm64" ]; then
    say "FAIL this is not an Apple-silicon Mac ($(uname -s)/$(uname -m)); the self-check verifies what only a Mac can"
    exit 2
fi

if [ -n "${SELFCHECK_PYTHON:-}" ]; then
    python=${SELFCHECK_PYTHON}
else
    say "making an environment in ${work_dir}/venv (mps-shim[stack], datasets, matplotlib)"
    python3 -m venv "${work_dir}/venv" >> "${result_file}" 2>&1 &&
        "${work_dir}/venv/bin/pip" install -q "${repo}[stack]" datasets matplotlib >> "${result_file}" 2>&1
    verdict "environment" $? "pip could not install mps-shim's stack (see the file)"
    python="${work_dir}/venv/bin/python"
fi
shim="$(dirname "${python}")/mps-shim"
section "library versions"
"${python}" -m pip list 2>/dev/null | grep -iE "^(mps-shim|torch|transformers|accelerate|peft|datasets) " >> "${result_file}"

# 1-2. MPS present; doctor's probes.
section "mps-shim doctor --json"
"${shim}" doctor --json > "${work_dir}/doctor.json" 2>> "${result_file}"
cat "${work_dir}/doctor.json" >> "${result_file}"
"${python}" - "${work_dir}/doctor.json" >> "${result_file}" 2>&1 <<'EOF'
import json, sys
doctor = json.load(open(sys.argv[1]))
capabilities = doctor["capabilities"]
if not capabilities.get("mps"):
    print("NO MPS:", capabilities.get("reason"))
    sys.exit(1)
if doctor["device"]["simulated"]:
    print("the device is simulated: MPS_SHIM_SIMULATE leaked into the environment")
    sys.exit(1)
for note in capabilities.get("probe_notes", []):
    print("PROBE DISAGREES WITH THE TABLE:", note)
sys.exit(3 if capabilities.get("probe_notes") else 0)
EOF
status=$?
if [ ${status} -eq 1 ]; then
    say "FAIL no usable Apple GPU here: $(tail -n 1 "${result_file}")"
    exit 1
fi
verdict "doctor: a real Apple GPU, and its live probes agree with the capability table" $((status == 3)) \
    "a probe contradicts the table (the probe wins for the plan; please report it)"

# 3-4. Numerics and a real out-of-memory, in one Python process.
model_dir="${work_dir}/llama3-tiny"
"${python}" "${here}/tiny_model/build_tiny_model.py" --output "${model_dir}" >> "${result_file}" 2>&1
section "numerics and out-of-memory"
"${python}" - "${model_dir}" >> "${result_file}" 2>&1 <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1]
torch.manual_seed(0)
batch = torch.randint(0, 200, (4, 64))
results = {}
for device in ("cpu", "mps"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device)
    losses, norms = [], []
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=batch.to(device), labels=batch.to(device)).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    results[device] = (losses, norms)
print("cpu", results["cpu"], "\nmps", results["mps"])
worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(sum(results["cpu"], []), sum(results["mps"], [])))
print(f"largest relative difference, fp32 MPS vs CPU over 3 steps: {worst:.2e}")
numerics_ok = worst < 1e-3  # fp32 kernels differ in summation order only

import mps_shim  # activates on the real GPU
from mps_shim.oom import is_out_of_memory
mps_shim.deactivate()
torch.mps.set_per_process_memory_fraction(0.05)
try:
    held = [torch.empty(256 * 2**20, dtype=torch.uint8, device="mps") for _ in range(10_000)]
    oom_ok = False
    print("no out-of-memory at 5% of the working set")
except RuntimeError as error:
    print("out-of-memory text:", str(error).splitlines()[0])
    oom_ok = is_out_of_memory(error) and "MPS backend out of memory" in str(error)
sys.exit((0 if numerics_ok else 1) + (0 if oom_ok else 2))
EOF
status=$?
verdict "MPS fp32 numerics match the CPU within 1e-3 over 3 steps" $((status & 1)) "see the numbers in the file"
verdict "a real MPS out-of-memory is recognised by the shim" $((status & 2)) "see the text in the file"

# 5-6. The example under the shim: a short run, then the same run at a forced small budget.
run_example() {  # run_example NAME [mps-shim options...]
    local name=$1; shift
    cp -R "${here}/data" "${work_dir}/data-${name}"
    PRETRAINED_MODEL="${model_dir}" DATASET_DIR="${work_dir}/data-${name}/sft" \
        VALIDATION_FILE="${work_dir}/data-${name}/validation.json" OUTPUT_DIR="${work_dir}/out-${name}" \
        MAX_STEPS=6 EVAL_STEPS=3 SAVE_STEPS=100 SEED=42 \
        "${shim}" --report "${work_dir}/report-${name}.json" "$@" bash "${here}/sft/run_sft.sh" \
        > "${work_dir}/run-${name}.log" 2>&1
    local status=$?
    section "run ${name}: exit ${status}; last 40 lines of the log, then the report"
    tail -n 40 "${work_dir}/run-${name}.log" >> "${result_file}"
    cat "${work_dir}/report-${name}.json" >> "${result_file}" 2>/dev/null
    return ${status}
}
check_report() {  # check_report NAME PYTHON-CONDITION (on `report`)
    "${python}" - "${work_dir}/report-$1.json" "$2" >> "${result_file}" 2>&1 <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
ok = eval(sys.argv[2], {"report": report, "json": json, "sys": sys})
print("condition", sys.argv[2], "->", ok)
sys.exit(0 if ok else 1)
EOF
}
run_example plain
status=$?
[ ${status} -eq 0 ] && check_report plain \
    "report['device']['type'] == 'mps' and report['device']['simulated'] is False and report['precision']['chosen']"
verdict "the example trains under the shim on a real (not simulated) mps" $? "exit ${status}; see the file"
check_report plain "any(c['target'] == 'environment PYTORCH_MPS_HIGH_WATERMARK_RATIO' for c in report['changes'])"
verdict "the watermark variables were set before torch started its allocator" $? "see the report"

peak=$("${python}" -c "import json,sys; print(json.load(open(sys.argv[1]))['memory']['estimated_peak_unsplit_bytes'])" \
    "${work_dir}/report-plain.json" 2>/dev/null)
if [ -n "${peak}" ]; then
    run_example tight --memory-limit "$((peak * 3 / 4))"
    status=$?
    [ ${status} -eq 0 ] && check_report tight \
        "(report['batch'].get('chunks_per_batch', 1) > 1 or any(e['kind'] == 'oom_recovered' for e in report['events'])) and report['batch']['effective_batch'] == json.load(open(sys.argv[1].replace('tight', 'plain')))['batch']['effective_batch']"
    verdict "at a forced small budget the batch is split or recovered, the effective batch kept" $? "exit ${status}"
else
    verdict "at a forced small budget the batch is split or recovered" 1 "the first run left no estimate"
fi

# 7. torch imported before the shim: the budget is applied as a memory fraction.
section "torch imported first"
"${python}" - >> "${result_file}" 2>&1 <<'EOF'
import torch
import mps_shim
from mps_shim import runtime
torch.ones(1, device="mps")
budget = runtime.current().budget.bytes
notes = mps_shim.report()["notes"]
print("budget", budget, "notes", notes)
raise SystemExit(0 if budget and any("imported before mps_shim" in n for n in notes) else 1)
EOF
verdict "torch imported first: the shim says so and still enforces the budget" $? "see the file"

say "${failures} check(s) failed; attach ${result_file} to your bug report"
exit $((failures > 0))
