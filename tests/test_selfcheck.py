"""examples/mac-selfcheck.sh: what can be checked of it without a Mac."""
from __future__ import annotations

import re

from support import REPO, clean_env, run

SCRIPT = REPO / "examples" / "mac-selfcheck.sh"


def test_it_parses_and_refuses_anything_but_an_apple_silicon_mac_with_one_line(tmp_path):
    assert run(["bash", "-n", SCRIPT]).returncode == 0
    result = run(["bash", SCRIPT], env=clean_env(SELFCHECK_DIR=str(tmp_path), MPS_SHIM_SIMULATE="1"), cwd=tmp_path)
    assert result.returncode == 2
    written = list(tmp_path.glob("mps-shim-selfcheck-*.txt"))
    assert len(written) == 1  # one file to attach, even when it stops at once
    assert "FAIL this is not an Apple-silicon Mac" in written[0].read_text()


def test_its_embedded_python_compiles():
    text = SCRIPT.read_text()
    blocks = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        compile(block, "mac-selfcheck.sh", "exec")
