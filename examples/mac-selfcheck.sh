#!/bin/bash
# Self-check for a real Apple-silicon Mac: runs `mps-shim doctor`, then 20 real MPS training steps
# of the tiny Llama-3 demo under the shim, and writes ONE file to attach to a bug report:
#     mps-shim-selfcheck-<date>.txt   (in the current folder, or SELFCHECK_DIR)
# It contains the doctor report (JSON), the library versions, the tail of the run's log and the
# shim's JSON report. Nothing is uploaded anywhere.
#
# Usage: bash examples/mac-selfcheck.sh     (from the environment where mps-shim is installed)
set -u

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
steps=${SELFCHECK_STEPS:-20}
stamp=$(date +%Y%m%d-%H%M%S)
result_file="${SELFCHECK_DIR:-$PWD}/mps-shim-selfcheck-${stamp}.txt"
work_dir=$(mktemp -d "${TMPDIR:-/tmp}/mps-shim-selfcheck.XXXXXX")
model_dir="${here}/tiny_model/llama3-tiny"
report="${work_dir}/report.json"
run_log="${work_dir}/run.log"

section() {
    printf '\n===== %s =====\n' "$1" >> "${result_file}"
}

echo "mps-shim self-check; writing ${result_file}"
: > "${result_file}"

section "machine"
{ uname -a; sw_vers 2>/dev/null; sysctl -n machdep.cpu.brand_string hw.memsize 2>/dev/null; } >> "${result_file}" 2>&1

section "mps-shim doctor --json"
mps-shim doctor --json >> "${result_file}" 2>&1
echo "doctor exit status: $?" >> "${result_file}"

section "library versions"
"${python}" - >> "${result_file}" 2>&1 <<'EOF'
import importlib.metadata as metadata
import platform
print("python", platform.python_version())
for name in ["mps-shim", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "safetensors"]:
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF

if [ ! -f "${model_dir}/model.safetensors" ]; then
    echo "building the tiny model in ${model_dir}"
    "${python}" "${here}/tiny_model/build_tiny_model.py" --output "${model_dir}" >> "${run_log}" 2>&1
fi

echo "running ${steps} training steps under mps-shim (log: ${run_log})"
# The data is copied so the token cache run_sft.sh writes next to it stays out of the source tree.
cp -R "${here}/data" "${work_dir}/data"
start=$(date +%s)
MPS_SHIM_REPORT="${report}" \
PRETRAINED_MODEL="${model_dir}" \
DATASET_DIR="${work_dir}/data/sft" \
VALIDATION_FILE="${work_dir}/data/validation.json" \
OUTPUT_DIR="${work_dir}/output" \
MAX_STEPS="${steps}" \
SEED=42 \
    mps-shim bash "${here}/sft/run_sft.sh" >> "${run_log}" 2>&1
run_status=$?
elapsed=$(( $(date +%s) - start ))

section "training run: exit status ${run_status}, ${elapsed} s, last 80 lines of the log"
tail -n 80 "${run_log}" >> "${result_file}"

section "mps-shim report (${report})"
if [ -f "${report}" ]; then cat "${report}" >> "${result_file}"; else echo "no report was written" >> "${result_file}"; fi

section "summary"
"${python}" "${here}/demo_summary.py" "${work_dir}/output" "${report}" --plot "${work_dir}/loss.png" >> "${result_file}" 2>&1

echo "training exit status ${run_status}; attach ${result_file} to your bug report"
exit "${run_status}"
