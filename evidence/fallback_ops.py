#!/usr/bin/env python3
"""Which aten ops have no MPS kernel in each torch release, read from torch's macOS arm64 wheels; writes
shim/cpu_fallback_ops.py (pure data, used by the simulated Apple GPU).

For each cached wheel (out/evidence-wheels/, one per minor release, as evidence/extract.py chooses them):

* torchgen/packaged/ATen/native/native_functions.yaml: every op of the release and its dispatch keys. An op whose only
  kernel is CompositeImplicitAutograd is decomposed before any backend is chosen, so it can never fall back.
* torch/lib/libtorch_cpu.dylib: the op names each `TORCH_LIBRARY_IMPL(aten, <key>, m)` registration function
  references (the local symbols `TORCH_LIBRARY_IMPL_init_aten_<key>_N`, decoded with extract.MachO.references).
  An op registered for MPS, CompositeExplicitAutograd or CompositeExplicitAutogradNonFunctional has a kernel on MPS.
* The registration function of MPSFallback.mm (the one that references `make_boxed_function<mps_fallback>`): the ops
  it registers run mps_fallback itself, so they fall back although they are registered for MPS.

An op of the yaml that reaches a backend and has no kernel on MPS falls back. A structured functional or in-place op
whose only kernel on MPS is the generated CompositeExplicitAutogradNonFunctional wrapper calls its out variant, so it
falls back under the out variant's name (e.g. `isin.Tensor_Tensor` falls back as `aten::isin.Tensor_Tensor_out` on
2.2-2.3). Ops ending in `_for_cpu` are the CPU's own routes (e.g. SDPA's CPU flash kernel), never taken on MPS.

    python evidence/fallback_ops.py      # needs PyYAML and the cached wheels
"""
from __future__ import annotations

import re
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import CACHE_DIR, MachO, adrp_offset, minor_of  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "shim" / "cpu_fallback_ops.py"
YAML = "torchgen/packaged/ATen/native/native_functions.yaml"
LIB = "torch/lib/libtorch_cpu.dylib"
HAS_KERNEL_KEYS = ("MPS", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
IMPLICIT = {"CompositeImplicitAutograd", "CompositeImplicitAutogradNestedTensor"}
# Registered in MPSFallback.mm beside the fallbacks, but with a kernel of their own or as a fallthrough.
NOT_FALLBACKS = {"_slow_conv2d_forward", "upsample_nearest3d.vec"}


def yaml_ops(text: str) -> dict[str, dict]:
    import yaml

    ops = {}
    for entry in yaml.safe_load(text):
        keys = set()
        for key in entry.get("dispatch") or {}:
            keys |= {k.strip() for k in key.split(",")}
        ops[entry["func"].split("(")[0]] = {"keys": keys, "delegate": entry.get("structured_delegate")}
    return ops


def registered(lib: MachO, key: str) -> set[str]:
    names = set()
    for function in lib.function_names(rf"TORCH_LIBRARY_IMPL_init_aten_{key}_\d+E"):
        names |= {value for _pc, kind, value in lib.references(function) if kind == "str"}
    return names


def explicit_fallbacks(lib: MachO) -> set[str]:
    """The ops MPSFallback.mm registers with mps_fallback itself."""
    boxed = {a for n, a in lib.symbols.items() if "make_boxed_function" in n and "L12mps_fallback" in n}
    found = set()
    for function in lib.function_names(r"TORCH_LIBRARY_IMPL_init_aten_MPS_\d+E"):
        start, end = lib.function_range(function)
        base, pages, hit = lib.file_offset(start), {}, False
        for pc in range(start, end, 4):
            word = struct.unpack_from("<I", lib.data, base + pc - start)[0]
            if (word & 0x9F000000) == 0x90000000:
                pages[word & 31] = (pc & ~0xFFF) + adrp_offset(word)
            elif (word & 0xFFC00000) == 0x91000000 and (word >> 5) & 31 in pages:
                hit = hit or pages[(word >> 5) & 31] + ((word >> 10) & 0xFFF) in boxed
        if hit:
            found |= {v for _pc, kind, v in lib.references(function) if kind == "str"}
    return found - NOT_FALLBACKS


def fallbacks_of(wheel: Path) -> dict[str, str]:
    """{op seen at dispatch: op named in the fallback warning} for one release."""
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as work:
        ops = yaml_ops(archive.read(YAML).decode())
        archive.extract(LIB, work)
        lib = MachO(Path(work) / LIB)
        try:
            with_kernel = set().union(*(registered(lib, key) for key in HAS_KERNEL_KEYS))
            explicit = explicit_fallbacks(lib)
            mps = registered(lib, "MPS") - explicit
            implicit = registered(lib, "CompositeImplicitAutograd")
        finally:
            lib.close()
    falls = {}
    for name, op in ops.items():
        reaches = bool(op["keys"] - IMPLICIT) or op["delegate"] is not None
        if not reaches or name in implicit or name.endswith("_for_cpu") or "_for_cpu_" in name:
            continue
        if name in explicit or name not in with_kernel:
            falls[name] = name
    for name, op in ops.items():  # structured functional/in-place ops through their generated wrapper
        delegate = op["delegate"]
        if delegate in falls and name not in mps and name not in falls:
            falls[name] = delegate
    return falls


def release_ranges(per_release: dict[str, dict[str, str]]) -> dict[tuple[str, str], list[str]]:
    """Group `seen` or `seen>reported` entries by the first and last release in which they fall back."""
    releases = list(per_release)
    spans: dict[str, list[str]] = {}
    for release in releases:
        for seen, reported in per_release[release].items():
            spans.setdefault(seen if seen == reported else f"{seen}>{reported}", []).append(release)
    grouped: dict[tuple[str, str], list[str]] = {}
    for entry, present in spans.items():
        first, last = releases.index(present[0]), releases.index(present[-1])
        if releases[first:last + 1] != present:
            raise SystemExit(f"{entry} falls back in non-adjacent releases {present}: the data format needs a range")
        grouped.setdefault((present[0], present[-1]), []).append(entry)
    return grouped


def render(grouped: dict[tuple[str, str], list[str]], wheels: list[str]) -> str:
    lines = [
        '"""aten ops with no MPS kernel, by torch release: generated by evidence/fallback_ops.py from torch\'s macOS',
        "arm64 wheels; do not edit. Used by shim/simulated_fallback.py.",
        "",
        "Wheels read: " + ", ".join(wheels) + ".",
        "",
        "FALLBACKS maps (first release, last release) to the ops that fall back to the CPU in each release of that range",
        "(PYTORCH_ENABLE_MPS_FALLBACK=1); `seen>reported` is an op that falls back under its out variant's name.",
        '"""',
        "",
        "FALLBACKS = {",
    ]
    for (first, last), entries in sorted(grouped.items(), key=lambda item: (Version(item[0][0]), Version(item[0][1]))):
        lines.append(f'    ("{first}", "{last}"): """')
        line = ""
        for entry in sorted(entries):
            if len(line) + len(entry) + 1 > 116:
                lines.append(line.rstrip())
                line = ""
            line += entry + " "
        lines.append(line.rstrip())
        lines.append('""".split(),')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    newest: dict[Version, Path] = {}
    for wheel in sorted(CACHE_DIR.glob("torch-*-macosx_*_arm64.whl")):
        version = Version(wheel.name.split("-")[1])
        minor = minor_of(version)
        if minor not in newest or Version(newest[minor].name.split("-")[1]) < version:
            newest[minor] = wheel
    per_release = {}
    for minor in sorted(newest):
        per_release[f"{minor.major}.{minor.minor}"] = fallbacks_of(newest[minor])
        print(f"{minor}: {len(per_release[f'{minor.major}.{minor.minor}'])} ops fall back", file=sys.stderr)
    OUTPUT.write_text(render(release_ranges(per_release), [newest[m].name for m in sorted(newest)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
