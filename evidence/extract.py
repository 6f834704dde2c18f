#!/usr/bin/env python3
"""Facts about torch on Apple-silicon Macs, read from torch's own macOS arm64 wheels.

For every torch minor release from 2.2 on, the newest patch release's macOS arm64 wheel (CPython 3.12) is downloaded
into out/evidence-wheels/ (kept as a cache) and read without being installed:

* Python sources are parsed with `ast` and matched with the regular expressions named next to each fact;
* torch/lib/libtorch_cpu.dylib and torch/lib/libc10.dylib are read as Mach-O files: C strings, symbol names, the
  Metal libraries embedded in __TEXT sections, and, for a few named C++ functions, the strings, Objective-C selectors
  and functions those functions reference (decoded from their arm64 ADRP/ADD/LDR/BL instructions).

The result is evidence/torch-macos.json: facts only, each release tagged with the wheel file it came from and that
file's sha256. The output is sorted and carries no timestamps, so a re-run over the same wheels gives the same bytes.

    python evidence/extract.py                # list releases with pip, download what is missing, extract
    python evidence/extract.py --cached-only  # no network: use the newest cached wheel of each minor release

Only the standard library and `packaging` are used.
"""
from __future__ import annotations

import argparse
import ast
import bisect
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "out" / "evidence-wheels"
WORK_DIR = ROOT / "out" / "evidence-work"
OUTPUT = ROOT / "evidence" / "torch-macos.json"

FIRST_RELEASE = Version("2.2")
PYTHON_VERSION = "3.12"
# torch's macOS arm64 wheels are tagged macosx_11_0_arm64 up to 2.11 and macosx_14_0_arm64 from 2.12.
PLATFORM_TAGS = ("macosx_11_0_arm64", "macosx_14_0_arm64")
SCHEMA_VERSION = 1

LIB_CPU = "torch/lib/libtorch_cpu.dylib"
LIB_C10 = "torch/lib/libc10.dylib"


# ----------------------------------------------------------------------------------------------------------------
# Finding and downloading the wheels
# ----------------------------------------------------------------------------------------------------------------

def pip_env() -> dict[str, str]:
    """Environment for pip download: no pip configuration files.

    The machine-wide pip configuration may constrain torch to what an install here may use; a download for another
    platform must not be constrained by it.
    """
    env = dict(os.environ)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def registry_versions() -> list[Version]:
    """Every final torch release the package index lists (`pip index versions torch`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "torch", "--disable-pip-version-check"],
        capture_output=True, text=True, env=pip_env(), check=False,
    )
    match = re.search(r"^Available versions: (.+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not match:
        sys.exit(f"pip index versions torch failed:\n{proc.stdout}\n{proc.stderr}")
    versions = []
    for text in match.group(1).split(","):
        try:
            version = Version(text.strip())
        except InvalidVersion:
            continue
        if not (version.is_prerelease or version.is_devrelease or version.local):
            versions.append(version)
    return versions


def minor_of(version: Version) -> Version:
    return Version(f"{version.major}.{version.minor}")


def cached_wheel(version: Version) -> Path | None:
    """The cached macOS arm64 CPython 3.12 wheel of exactly this version, if any."""
    found = []
    for path in CACHE_DIR.glob(f"torch-{version}-*.whl"):
        parts = path.name[:-4].split("-")
        # name-version[-build]-python-abi-platform
        if parts[1] == str(version) and parts[-1] in PLATFORM_TAGS and parts[-3] == "cp312":
            found.append(path)
    # Prefer the tag order of PLATFORM_TAGS; then the name, for determinism.
    found.sort(key=lambda p: (PLATFORM_TAGS.index(p.name[:-4].split("-")[-1]), p.name))
    return found[0] if found else None


def download_wheel(version: Version) -> Path | None:
    """Download the macOS arm64 wheel of `version` into the cache, trying each platform tag."""
    for tag in PLATFORM_TAGS:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "--only-binary=:all:",
             "--platform", tag, "--python-version", PYTHON_VERSION, "-d", str(CACHE_DIR), "-q",
             "--disable-pip-version-check"],
            capture_output=True, text=True, env=pip_env(), check=False,
        )
        if proc.returncode == 0:
            wheel = cached_wheel(version)
            if wheel:
                return wheel
    return None


def select_wheels(cached_only: bool) -> list[tuple[Version, Path]]:
    """(release, wheel) for each minor release from FIRST_RELEASE on: the newest patch that has a macOS wheel."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if cached_only:
        versions = []
        for path in CACHE_DIR.glob("torch-*.whl"):
            try:
                versions.append(Version(path.name.split("-")[1]))
            except InvalidVersion:
                continue
    else:
        versions = registry_versions()
    by_minor: dict[Version, list[Version]] = {}
    for version in set(versions):
        if version >= FIRST_RELEASE:
            by_minor.setdefault(minor_of(version), []).append(version)
    chosen = []
    for minor in sorted(by_minor):
        wheel = None
        for version in sorted(by_minor[minor], reverse=True):
            wheel = cached_wheel(version)
            if not wheel and not cached_only:
                wheel = download_wheel(version)
                print(f"torch {version}: downloaded {wheel.name}" if wheel else
                      f"torch {version}: no macOS arm64 wheel", flush=True)
            if wheel:
                chosen.append((version, wheel))
                break
        if not wheel:
            print(f"torch {minor}: no macOS arm64 wheel found", flush=True)
    return chosen


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Mach-O reading (64-bit little-endian arm64 dylibs)
# ----------------------------------------------------------------------------------------------------------------

LC_SEGMENT_64 = 0x19
LC_SYMTAB = 0x2
LC_DYSYMTAB = 0xB
LC_BUILD_VERSION = 0x32
MH_MAGIC_64 = 0xFEEDFACF
INDIRECT_SYMBOL_LOCAL = 0x80000000
INDIRECT_SYMBOL_ABS = 0x40000000


def macos_version(encoded: int) -> str:
    """LC_BUILD_VERSION's xxxx.yy.zz nibble encoding."""
    return f"{encoded >> 16}.{(encoded >> 8) & 0xFF}.{encoded & 0xFF}"


def adrp_offset(word: int) -> int:
    imm = ((word >> 29) & 3) | (((word >> 5) & 0x7FFFF) << 2)
    if imm & (1 << 20):
        imm -= 1 << 21
    return imm << 12


class MachO:
    """Sections, symbols and string references of one Mach-O dylib."""

    def __init__(self, path: Path):
        self._file = path.open("rb")
        self.data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        data = self.data
        magic, _cpu, _sub, _ftype, ncmds, _size, _flags, _res = struct.unpack_from("<IiiIIIII", data, 0)
        if magic != MH_MAGIC_64:
            raise ValueError(f"{path}: not a 64-bit Mach-O file")
        self.sections: list[tuple[str, str, int, int, int, int, int]] = []
        self.build_version: dict[str, str] | None = None
        symtab = dysymtab = None
        offset = 32
        for _ in range(ncmds):
            cmd, cmdsize = struct.unpack_from("<II", data, offset)
            if cmd == LC_SEGMENT_64:
                nsects = struct.unpack_from("<I", data, offset + 64)[0]
                sect_off = offset + 72
                for _ in range(nsects):
                    sectname = data[sect_off:sect_off + 16].rstrip(b"\0").decode()
                    segname = data[sect_off + 16:sect_off + 32].rstrip(b"\0").decode()
                    addr, size, fileoff = struct.unpack_from("<QQI", data, sect_off + 32)
                    reserved1, reserved2 = struct.unpack_from("<II", data, sect_off + 68)
                    self.sections.append((segname, sectname, addr, size, fileoff, reserved1, reserved2))
                    sect_off += 80
            elif cmd == LC_SYMTAB:
                symtab = struct.unpack_from("<IIII", data, offset + 8)
            elif cmd == LC_DYSYMTAB:
                dysymtab = struct.unpack_from("<II", data, offset + 8 + 48)  # indirectsymoff, nindirectsyms
            elif cmd == LC_BUILD_VERSION:
                platform, minos, sdk = struct.unpack_from("<III", data, offset + 8)
                self.build_version = {"platform": str(platform), "minos": macos_version(minos),
                                      "sdk": macos_version(sdk)}
            offset += cmdsize
        self.symbols: dict[str, int] = {}
        self.undefined: set[str] = set()
        names_by_index: dict[int, str] = {}
        if symtab:
            symoff, nsyms, stroff, _strsize = symtab
            for index in range(nsyms):
                strx, ntype, _nsect, _ndesc, value = struct.unpack_from("<IBBHQ", data, symoff + 16 * index)
                if ntype & 0xE0:  # debugging (stab) entry
                    continue
                end = data.find(b"\0", stroff + strx)
                name = data[stroff + strx:end].decode("latin-1")
                names_by_index[index] = name
                if (ntype & 0x0E) == 0x0E and value:  # N_SECT: defined here
                    self.symbols.setdefault(name, value)
                elif (ntype & 0x0E) == 0:
                    self.undefined.add(name)
        self.addresses = sorted(set(self.symbols.values()))
        self.name_at = {}
        for name, value in sorted(self.symbols.items()):
            self.name_at.setdefault(value, name)
        # Stubs of imported functions: __TEXT,__stubs entries, named through the indirect symbol table.
        self.stub_names: dict[int, str] = {}
        stubs = self.section("__TEXT", "__stubs")
        if stubs and dysymtab and stubs[6]:
            indirectsymoff = dysymtab[0]
            for k in range(stubs[3] // stubs[6]):
                index = struct.unpack_from("<I", data, indirectsymoff + 4 * (stubs[5] + k))[0]
                if index & (INDIRECT_SYMBOL_LOCAL | INDIRECT_SYMBOL_ABS):
                    continue
                if index in names_by_index:
                    self.stub_names[stubs[2] + k * stubs[6]] = names_by_index[index]

    def close(self) -> None:
        self.data.close()
        self._file.close()

    def section(self, segname: str, sectname: str):
        for sect in self.sections:
            if sect[0] == segname and sect[1] == sectname:
                return sect
        return None

    def section_at(self, addr: int):
        for sect in self.sections:
            if sect[2] <= addr < sect[2] + sect[3]:
                return sect
        return None

    def file_offset(self, addr: int) -> int | None:
        sect = self.section_at(addr)
        if sect is None or sect[4] == 0:
            return None
        return addr - sect[2] + sect[4]

    def cstring_at(self, addr: int) -> str | None:
        offset = self.file_offset(addr)
        if offset is None:
            return None
        end = self.data.find(b"\0", offset)
        return self.data[offset:end].decode("utf-8", "replace")

    def pointer_at(self, addr: int) -> int | None:
        """A rebased pointer stored at addr (plain or chained-fixup encoding), or None for a bind."""
        offset = self.file_offset(addr)
        if offset is None:
            return None
        value = struct.unpack_from("<Q", self.data, offset)[0]
        if value >> 63:
            return None
        return value & ((1 << 36) - 1)

    def section_bytes(self, segname: str, sectname: str) -> bytes:
        sect = self.section(segname, sectname)
        if not sect or not sect[4]:
            return b""
        return self.data[sect[4]:sect[4] + sect[3]]

    def cstrings(self) -> list[str]:
        """Every NUL-terminated string of __TEXT,__cstring."""
        raw = self.section_bytes("__TEXT", "__cstring")
        return [chunk.decode("utf-8", "replace") for chunk in raw.split(b"\0") if chunk]

    def function_names(self, pattern: str) -> list[str]:
        """Defined symbols whose mangled name matches `pattern` (re.search), sorted."""
        regex = re.compile(pattern)
        return sorted(name for name in self.symbols if regex.search(name))

    def function_range(self, name: str) -> tuple[int, int]:
        start = self.symbols[name]
        index = bisect.bisect_right(self.addresses, start)
        end = self.addresses[index] if index < len(self.addresses) else start
        return start, end

    def objc_stub_selector(self, addr: int) -> str | None:
        """The selector an __objc_stubs entry loads: `adrp x1, page; ldr x1, [x1, #off]`."""
        offset = self.file_offset(addr)
        first, second = struct.unpack_from("<II", self.data, offset)
        if (first & 0x9F00001F) != 0x90000001 or (second & 0xFFC00000) != 0xF9400000:
            return None
        selref = (addr & ~0xFFF) + adrp_offset(first) + ((second >> 10) & 0xFFF) * 8
        target = self.pointer_at(selref)
        return self.cstring_at(target) if target else None

    def references(self, name: str) -> list[tuple[int, str, str]]:
        """(address, kind, value) for what the function `name` references, in address order.

        kinds: "str" (a C string built by ADRP+ADD), "cfstr" (an Objective-C string literal), "sel" (a selector
        loaded from __objc_selrefs), "call_sel" (a call through an __objc_stubs entry: objc_msgSend with that
        selector), "call_import" (a call to an imported function), "call" (a call to a function of this file).
        """
        start, end = self.function_range(name)
        base = self.file_offset(start)
        pages: dict[int, int] = {}
        found: list[tuple[int, str, str]] = []
        for pc in range(start, end, 4):
            word = struct.unpack_from("<I", self.data, base + pc - start)[0]
            if (word & 0x9F000000) == 0x90000000:  # ADRP Xd, page
                pages[word & 31] = (pc & ~0xFFF) + adrp_offset(word)
            elif (word & 0xFFC00000) == 0x91000000:  # ADD Xd, Xn, #imm12
                rn, rd = (word >> 5) & 31, word & 31
                if rn in pages:
                    self._classify(pages[rn] + ((word >> 10) & 0xFFF), pc, found, load=False)
                pages.pop(rd, None)
            elif (word & 0xFFC00000) == 0xF9400000:  # LDR Xt, [Xn, #imm12*8]
                rn, rt = (word >> 5) & 31, word & 31
                if rn in pages:
                    self._classify(pages[rn] + ((word >> 10) & 0xFFF) * 8, pc, found, load=True)
                pages.pop(rt, None)
            elif (word & 0x7C000000) == 0x14000000:  # BL label (a call) or B label (a tail call when it leaves)
                imm = word & 0x3FFFFFF
                if imm & 0x2000000:
                    imm -= 0x4000000
                target = pc + imm * 4
                if not word >> 31 and start <= target < end:
                    continue  # a branch inside this function
                sect = self.section_at(target)
                if sect and sect[1] == "__objc_stubs":
                    selector = self.objc_stub_selector(target)
                    if selector:
                        found.append((pc, "call_sel", selector))
                elif target in self.stub_names:
                    found.append((pc, "call_import", self.stub_names[target]))
                elif target in self.name_at:
                    found.append((pc, "call", self.name_at[target]))
                if word >> 31:  # a call clobbers the caller-saved registers
                    for reg in range(19):
                        pages.pop(reg, None)
            elif (word & 0x0A000000) == 0x08000000:  # other loads and stores
                if word & (1 << 22):  # a load writes Rt (and Rt2 for a pair)
                    pages.pop(word & 31, None)
                    pages.pop((word >> 10) & 31, None)
            elif (word & 0x1C000000) != 0x14000000:  # not a branch: assume it writes Rd
                pages.pop(word & 31, None)
        return found

    def _classify(self, target: int, pc: int, found: list, load: bool) -> None:
        sect = self.section_at(target)
        if not sect:
            return
        if not load and sect[1] in ("__cstring", "__objc_methname"):
            text = self.cstring_at(target)
            if text is not None:
                found.append((pc, "str", text))
        elif not load and sect[1] == "__cfstring":
            pointer = self.pointer_at(target + 16)
            text = self.cstring_at(pointer) if pointer else None
            if text is not None:
                found.append((pc, "cfstr", text))
        elif load and sect[1] == "__objc_selrefs":
            pointer = self.pointer_at(target)
            text = self.cstring_at(pointer) if pointer else None
            if text is not None:
                found.append((pc, "sel", text))

    def references_of_all(self, pattern: str) -> list[tuple[int, str, str]]:
        """References of every function matching `pattern` (including split-off `.cold.N` parts)."""
        refs = []
        for name in self.function_names(pattern):
            refs.extend(self.references(name))
        return sorted(refs)


def metal_libraries(lib: MachO) -> list[dict]:
    """Metal libraries embedded as non-standard __TEXT sections (metal_basic, metal_bfloat, metal_40, ...).

    A metallib starts with "MTLB"; bytes 12-15 are the target OS (0x81 = macOS) and its version (u16 major, u8 minor,
    u8 patch) as the metallib header records them.
    """
    found = []
    for segname, sectname, _addr, size, fileoff, _r1, _r2 in lib.sections:
        if segname != "__TEXT" or sectname.startswith("__") or not fileoff:
            continue
        head = lib.data[fileoff:fileoff + 24]
        entry = {"section": sectname, "size": size, "magic": head[:4].decode("latin-1")}
        if head[:4] == b"MTLB":
            os_byte = head[11]
            major, minor, patch = struct.unpack_from("<HBB", head, 12)
            entry["target_os"] = "macOS" if os_byte == 0x81 else f"0x{os_byte:02x}"
            entry["target_os_version"] = f"{major}.{minor}.{patch}"
        found.append(entry)
    return sorted(found, key=lambda e: e["section"])


def metal_function_names(lib: MachO) -> list[str]:
    """Function names of the embedded metallibs ("NAME" tag: u16 length, then the NUL-terminated name)."""
    names = set()
    for segname, sectname, _addr, size, fileoff, _r1, _r2 in lib.sections:
        if segname != "__TEXT" or sectname.startswith("__") or not fileoff:
            continue
        blob = lib.data[fileoff:fileoff + size]
        for match in re.finditer(rb"NAME(..)", blob, re.S):
            length = struct.unpack("<H", match.group(1))[0]
            raw = blob[match.end():match.end() + length]
            if length and raw.endswith(b"\0") and re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", raw[:-1]):
                names.add(raw[:-1].decode())
    return sorted(names)


# ----------------------------------------------------------------------------------------------------------------
# A small Itanium C++ name reader: enough to tell the argument types of c10::detail::torchCheckMsgImpl<...>
# ----------------------------------------------------------------------------------------------------------------

BUILTIN_TYPES = {"v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char", "s": "short",
                 "t": "unsigned short", "i": "int", "j": "unsigned int", "l": "long", "m": "unsigned long",
                 "x": "long long", "y": "unsigned long long", "f": "float", "d": "double", "e": "long double"}


class MangledTypes:
    """Parses the template arguments of a mangled nested name, tracking the substitution table."""

    def __init__(self, text: str):
        self.text, self.pos, self.subs = text, 0, []

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def number(self) -> int:
        start = self.pos
        while self.text[self.pos].isdigit():
            self.pos += 1
        return int(self.text[start:self.pos])

    def source_name(self) -> str:
        length = self.number()
        name = self.text[self.pos:self.pos + length]
        self.pos += length
        return name

    def substitution(self):
        self.pos += 1  # 'S'
        seq = ""
        while self.text[self.pos] != "_":
            seq += self.text[self.pos]
            self.pos += 1
        self.pos += 1
        index = int(seq, 36) + 1 if seq else 0
        return self.subs[index]

    def template_args(self) -> list:
        self.pos += 1  # 'I'
        args = []
        while self.peek() != "E":
            if self.peek() == "J":
                self.pos += 1
                pack = []
                while self.peek() != "E":
                    pack.append(self.type())
                self.pos += 1
                args.append(("pack", pack))
            else:
                args.append(self.type())
        self.pos += 1
        return args

    def nested(self):
        self.pos += 1  # 'N'
        while self.peek() in ("K", "V", "r"):
            self.pos += 1
        current = None
        while self.peek() != "E":
            if self.peek(2) == "St":
                self.pos += 2
                current = ("name", "std::" + self.source_name())
                self.subs.append(current)
            elif self.peek() == "S":
                current = self.substitution()
            elif self.peek() == "I":
                current = ("template", current, self.template_args())
                self.subs.append(current)
            else:
                current = ("name", (current[1] + "::" if current else "") + self.source_name())
                self.subs.append(current)
        self.pos += 1
        return current

    def type(self):
        char = self.peek()
        if char in BUILTIN_TYPES:
            self.pos += 1
            return ("builtin", BUILTIN_TYPES[char])
        if char == "A":
            self.pos += 1
            length = self.number()
            self.pos += 1  # '_'
            result = ("array", length, self.type())
        elif char in "PRK":
            self.pos += 1
            result = ({"P": "pointer", "R": "reference", "K": "const"}[char], self.type())
        elif char == "N":
            return self.nested()
        elif char == "S":
            result = self.substitution()
            if self.peek() == "I":
                result = ("template", result, self.template_args())
                self.subs.append(result)
            return result
        elif char.isdigit():
            result = ("name", self.source_name())
            self.subs.append(result)
            if self.peek() == "I":
                result = ("template", result, self.template_args())
                self.subs.append(result)
            return result
        else:
            raise ValueError(f"unsupported mangling at {self.text[self.pos:self.pos + 12]!r}")
        self.subs.append(result)
        return result


def describe_type(node) -> str:
    kind = node[0]
    if kind == "array":
        return f"{describe_type(node[2])}[{node[1]}]"
    if kind == "builtin":
        return node[1]
    if kind == "pointer":
        return describe_type(node[1]) + "*"
    if kind == "const":
        return "const " + describe_type(node[1])
    if kind == "reference":
        return describe_type(node[1]) + "&"
    if kind == "template":
        base = describe_type(node[1])
        return "std::string" if base.endswith("::basic_string") else base + "<...>"
    if kind == "name":
        return node[1]
    return kind


def torch_check_arg_types(mangled: str) -> list[str] | None:
    """Argument types of a `c10::detail::torchCheckMsgImpl<Args...>` instantiation, in order."""
    prefix = "__ZN3c106detail17torchCheckMsgImplI"
    if not mangled.startswith(prefix):
        return None
    parser = MangledTypes(mangled[3:])  # from "N3c10..."
    try:
        node = parser.nested()
    except (ValueError, IndexError):
        return None
    if node[0] != "template":
        return None
    types = []
    for arg in node[2]:
        for item in (arg[1] if arg[0] == "pack" else [arg]):
            types.append(describe_type(item))
    return types


def itanium_nested_name(mangled: str) -> str:
    """`__ZN2at3mps12MPSAllocator14getDeviceStatsEa` -> `at::mps::MPSAllocator::getDeviceStats` (names only)."""
    match = re.match(r"_?_ZN(?:K)?", mangled)
    if not match:
        return mangled
    pos, parts = match.end(), []
    while pos < len(mangled) and mangled[pos].isdigit():
        num = re.match(r"\d+", mangled[pos:]).group(0)
        pos += len(num)
        parts.append(mangled[pos:pos + int(num)])
        pos += int(num)
    return "::".join(parts) if parts else mangled


# ----------------------------------------------------------------------------------------------------------------
# Python sources
# ----------------------------------------------------------------------------------------------------------------

class Wheel:
    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())

    def text(self, member: str) -> str | None:
        if member not in self.names:
            return None
        return self.zip.read(member).decode("utf-8")

    def tree(self, member: str) -> ast.Module | None:
        source = self.text(member)
        if source is None:
            return None
        return ast.parse(source)

    def extract(self, member: str, into: Path) -> Path:
        target = into / member
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.zip.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return target


def function_def(tree: ast.AST, name: str, cls: str | None = None) -> ast.FunctionDef | None:
    scope = tree
    if cls is not None:
        scope = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if scope is None:
            return None
    for node in ast.walk(scope):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


def module_functions(tree: ast.Module | None) -> list[str]:
    if tree is None:
        return []
    return sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef))


def string_constants(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def parents_of(root: ast.AST) -> dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(root):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def is_device_compare(test: ast.AST, device: str) -> bool:
    """`self.device == "<device>"`."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and isinstance(test.left, ast.Attribute) and test.left.attr == "device"
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == device)


def mentions_name(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def dtype_list(node: ast.AST) -> list[str] | None:
    """`[torch.bfloat16, torch.float16]` -> ["torch.bfloat16", "torch.float16"]."""
    if not isinstance(node, ast.List):
        return None
    values = []
    for elt in node.elts:
        if isinstance(elt, ast.Attribute) and isinstance(elt.value, ast.Name):
            values.append(f"{elt.value.id}.{elt.attr}")
        else:
            return None
    return values


class MessageRenderer:
    """Evaluates the warning-message expressions of autocast's __init__ for one device.

    Supports what those expressions use: string constants, f-strings over known names, `+`, `", ".join(map(str, X))`
    and `", ".join(str(d) for d in X)`, and names bound by `name = <expr>` / `name += <expr>` earlier in the same
    function. Anything else renders as None.
    """

    def __init__(self, env: dict[str, object]):
        self.env = dict(env)
        self.pinned = set(env)  # names given by the caller keep their value

    def value(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            return f"torch.{node.attr}"
        if isinstance(node, ast.List):
            items = [self.value(e) for e in node.elts]
            return None if any(i is None for i in items) else items
        if isinstance(node, ast.JoinedStr):
            parts = []
            for piece in node.values:
                if isinstance(piece, ast.Constant):
                    parts.append(str(piece.value))
                elif isinstance(piece, ast.FormattedValue):
                    inner = self.value(piece.value)
                    if inner is None:
                        return None
                    parts.append(str(inner))
            return "".join(parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.value(node.left), self.value(node.right)
            return left + right if isinstance(left, str) and isinstance(right, str) else None
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
                and isinstance(node.func.value, ast.Constant) and len(node.args) == 1):
            arg = node.args[0]
            items = None
            if (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "map"
                    and len(arg.args) == 2):
                items = self.value(arg.args[1])
            elif isinstance(arg, ast.GeneratorExp):
                items = self.value(arg.generators[0].iter)
            if isinstance(items, list):
                return node.func.value.value.join(str(i) for i in items)
        return None

    def assign(self, stmt: ast.stmt) -> None:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id not in self.pinned):
            self.env[stmt.targets[0].id] = self.value(stmt.value)
        elif (isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add)
              and isinstance(stmt.target, ast.Name) and stmt.target.id not in self.pinned):
            old, new = self.env.get(stmt.target.id), self.value(stmt.value)
            self.env[stmt.target.id] = old + new if isinstance(old, str) and isinstance(new, str) else None


def statements_before(func: ast.FunctionDef, target: ast.AST, parents: dict) -> list[ast.stmt]:
    """The assignment statements executed before `target` on its path through `func` (same and enclosing blocks)."""
    chain = []
    node = target
    while node is not func:
        parent = parents[node]
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and node in block:
                chain.append((block, block.index(node)))
        node = parent
    ordered = []
    for block, index in reversed(chain):
        ordered.extend(s for s in block[:index] if isinstance(s, (ast.Assign, ast.AugAssign)))
    return ordered


def enclosing_stmt(node: ast.AST, parents: dict) -> ast.stmt:
    while not isinstance(node, ast.stmt):
        node = parents[node]
    return node


def template_text(node: ast.AST) -> str | None:
    """A string constant, or an f-string with each replacement field shown as {expression}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(p.value) if isinstance(p, ast.Constant) else "{" + ast.unparse(p.value) + "}"
                       for p in node.values)
    return None


def analyse_autocast(wheel: Wheel, autocast_mps_key: bool) -> dict:
    """torch.autocast(device_type="mps") as torch/amp/autocast_mode.py implements it."""
    member = "torch/amp/autocast_mode.py"
    tree = wheel.tree(member)
    init = function_def(tree, "__init__", cls="autocast") if tree else None
    if init is None:
        return {"source": member, "found": False}
    parents = parents_of(init)
    facts: dict[str, object] = {"source": member, "found": True}

    # 1. The "unsupported autocast device_type" RuntimeError and what decides it.
    unsupported = None
    for node in ast.walk(init):
        if isinstance(node, ast.Raise) and any("unsupported autocast device_type" in s
                                               for s in string_constants(node)):
            unsupported = node
            break
    facts["unsupported_device_error"] = (
        template_text(unsupported.exc.args[0])
        if unsupported is not None and isinstance(unsupported.exc, ast.Call) and unsupported.exc.args else None)
    # which check leads to it: an if/elif chain over self.device, or is_autocast_available()
    check = None
    if unsupported is not None:
        parent = parents[unsupported]
        if isinstance(parent, ast.If) and unsupported in parent.body and any(
                isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "is_autocast_available"
                for n in ast.walk(parent.test)):
            check = "is_autocast_available"
        else:
            check = "device_if_chain"
    facts["device_check"] = check
    # devices the if/elif chain before the raise names explicitly
    chain_devices = sorted({n.comparators[0].value for n in ast.walk(init)
                            if isinstance(n, ast.Compare) and len(n.comparators) == 1
                            and isinstance(n.comparators[0], ast.Constant)
                            and isinstance(n.comparators[0].value, str)
                            and isinstance(n.left, ast.Attribute) and n.left.attr == "device"
                            and unsupported is not None and n.lineno < unsupported.lineno})
    facts["devices_named_before_check"] = chain_devices
    if check == "device_if_chain":
        mps_accepted = "mps" in chain_devices
    elif check == "is_autocast_available":
        # torch._C._is_autocast_available(device) is true only for devices with an Autocast<Device> dispatch key;
        # libc10's DispatchKey names include "AutocastMPS" exactly where that key exists.
        mps_accepted = autocast_mps_key
    else:
        mps_accepted = None
    facts["mps_device_accepted"] = mps_accepted

    # 2. Is `enabled` read before the raise? (reads inside the `if torch._jit_internal.is_scripting():` early
    #    return do not count)
    def in_scripting_branch(node: ast.AST) -> bool:
        while node is not init:
            node = parents[node]
            if isinstance(node, ast.If) and "is_scripting" in ast.unparse(node.test):
                return True
        return False

    enabled_reads = sorted(n.lineno for n in ast.walk(init)
                           if isinstance(n, ast.Name) and n.id == "enabled" and isinstance(n.ctx, ast.Load)
                           and not in_scripting_branch(n))
    first_read = enabled_reads[0] if enabled_reads else None
    raise_before_enabled = (unsupported is not None and (first_read is None or unsupported.lineno < first_read))
    facts["device_check_precedes_enabled"] = raise_before_enabled
    facts["mps_raises_when_disabled"] = bool(raise_before_enabled and mps_accepted is False)

    # 3. MPS warnings: every warnings.warn whose rendered message (device name "MPS") starts with "In MPS autocast".
    device_branches = [n for n in ast.walk(init) if isinstance(n, ast.If) and is_device_compare(n.test, "mps")]
    base_env = {"device_name": "MPS"}
    warnings_found = []
    for node in ast.walk(init):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"
                and node.args):
            continue
        stmt = enclosing_stmt(node, parents)
        renderer = MessageRenderer(base_env)
        for earlier in statements_before(init, stmt, parents):
            renderer.assign(earlier)
        text = renderer.value(node.args[0])
        if not isinstance(text, str) or not text.startswith("In MPS autocast"):
            continue
        # the conditions on the way to this warning
        conditions, guarded_by_enabled, unreachable = [], False, False
        child, parent = stmt, parents[stmt]
        while parent is not init:
            if isinstance(parent, ast.If):
                branch = "if" if child in parent.body else "else"
                conditions.append(f"{branch} {ast.unparse(parent.test)}")
                if branch == "if" and mentions_name(parent.test, "enabled"):
                    guarded_by_enabled = True
                # `fast_dtype not in LIST` where LIST holds bfloat16, around a bfloat16 check: never true together
                test = parent.test
                if (branch == "if" and isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.NotIn)
                        and "bfloat16" in text):
                    holder = renderer.value(test.comparators[0])
                    if isinstance(holder, list) and "torch.bfloat16" in holder:
                        unreachable = True
            child, parent = parent, parents[parent]
        warnings_found.append({
            "text": text,
            "line": stmt.lineno,
            "conditions": list(reversed(conditions)),
            "requires_enabled": guarded_by_enabled,
            "cannot_fire_for_bfloat16": unreachable,
        })
    warnings_found.sort(key=lambda w: w["line"])
    for warning in warnings_found:
        del warning["line"]
    facts["mps_warnings"] = warnings_found
    facts["mps_warns_when_disabled"] = any(not w["requires_enabled"] for w in warnings_found)

    def pick(predicate) -> str | None:
        return next((w["text"] for w in warnings_found if predicate(w["text"])), None)

    facts["unsupported_dtype_warning"] = pick(lambda t: "target dtype is not supported" in t)
    facts["bf16_below_macos14_warning"] = pick(lambda t: "below 14" in t)
    bf16_warning = next((w for w in warnings_found if "below 14" in w["text"]), None)
    facts["bf16_below_macos14_check"] = (
        "absent" if bf16_warning is None else ("unreachable" if bf16_warning["cannot_fire_for_bfloat16"]
                                               else "reachable"))

    # 4. The dtypes the MPS path accepts: a `supported_dtype(s) = [...]` list in the `self.device == "mps"` branch,
    #    else the device-generic `device_supported_dtypes = [...]` list.
    accepted = None
    for branch in device_branches:
        for stmt in branch.body:
            if isinstance(stmt, ast.Assign) and dtype_list(stmt.value) is not None:
                accepted = dtype_list(stmt.value)
                break
        if accepted:
            break
    if accepted is None:
        for stmt in init.body:
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id == "device_supported_dtypes" and dtype_list(stmt.value) is not None):
                accepted = dtype_list(stmt.value)
    facts["mps_accepted_dtypes"] = accepted if mps_accepted else []
    facts["mps_branch"] = "device_specific" if device_branches else ("generic" if mps_accepted else None)
    # The fp32 (unsupported dtype) warning: what torch.autocast("mps", dtype=torch.float32) prints.
    facts["fp32_warning"] = facts["unsupported_dtype_warning"] if mps_accepted else None
    return facts


def analyse_foreach_and_fused(wheel: Wheel, lib: MachO) -> dict:
    member = "torch/utils/_foreach_utils.py"
    tree = wheel.tree(member)
    facts: dict[str, object] = {"source": member}
    for key, func_name in (("foreach_supported_devices", "_get_foreach_kernels_supported_devices"),
                           ("fused_supported_devices", "_get_fused_kernels_supported_devices")):
        func = function_def(tree, func_name) if tree else None
        devices = None
        if func is not None:
            for node in ast.walk(func):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.List):
                    devices = []
                    for elt in node.value.elts:
                        if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                            devices.append(elt.value)
                        else:
                            devices.append(f"<{ast.unparse(elt)}>")
        facts[key] = devices
    facts["mps_in_foreach_supported_devices"] = "mps" in (facts["foreach_supported_devices"] or [])
    facts["mps_in_fused_supported_devices"] = "mps" in (facts["fused_supported_devices"] or [])

    # How Adam / AdamW check fused=True: through _get_fused_kernels_supported_devices, directly in the optimizer
    # module or through torch/optim/optimizer.py's _device_dtype_check_for_fused.
    optimizer_src = wheel.text("torch/optim/optimizer.py") or ""
    helper_uses_list = bool(re.search(r"def _device_dtype_check_for_fused\(.*?_get_fused_kernels_supported_devices\(\)",
                                      optimizer_src, re.S))
    for opt in ("adam", "adamw"):
        source = wheel.text(f"torch/optim/{opt}.py") or ""
        direct = "_get_fused_kernels_supported_devices()" in source
        via_helper = "_device_dtype_check_for_fused(" in source and helper_uses_list
        subclass_of_adam = bool(re.search(r"^class AdamW\(Adam\):", source, re.M)) if opt == "adamw" else False
        facts[f"{opt}_fused_check"] = ("_get_fused_kernels_supported_devices" if direct else
                                       "_device_dtype_check_for_fused" if via_helper else
                                       "inherited from Adam" if subclass_of_adam else None)
    adam_checked = facts["adam_fused_check"] is not None
    adamw_checked = facts["adamw_fused_check"] is not None
    facts["fused_true_accepted_on_mps"] = bool(
        facts["mps_in_fused_supported_devices"] and adam_checked and adamw_checked)
    kernels = sorted({itanium_nested_name(n) for n in lib.symbols
                      if re.search(r"_fused_adamw?_kernel_mps_", n)})
    facts["mps_fused_adam_kernels"] = kernels
    return facts


def analyse_grad_scaler(wheel: Wheel) -> dict:
    """Whether torch's GradScaler hands grad_scale/found_inf to optimizers, and how Adam receives them."""
    member = next((m for m in ("torch/amp/grad_scaler.py", "torch/cuda/amp/grad_scaler.py") if m in wheel.names),
                  None)
    facts: dict[str, object] = {"source": member}
    source = wheel.text(member) if member else None
    if source is None:
        return facts
    tree = ast.parse(source)
    step = function_def(tree, "step", cls="GradScaler")
    assigns = []
    gate = None
    if step is not None:
        parents = parents_of(step)
        for node in ast.walk(step):
            if isinstance(node, (ast.Assign,)):
                for target in node.targets:
                    if (isinstance(target, ast.Attribute) and target.attr in ("grad_scale", "found_inf")
                            and isinstance(target.value, ast.Name) and target.value.id == "optimizer"):
                        assigns.append(f"optimizer.{target.attr}")
                        walker = node
                        while walker is not step:
                            walker = parents[walker]
                            if isinstance(walker, ast.If) and "_step_supports_amp_scaling" in ast.unparse(walker.test):
                                gate = ast.unparse(walker.test)
    facts["step_sets_optimizer_attributes"] = sorted(set(assigns))
    facts["step_sets_them_only_when"] = gate
    facts["unscale_avoids_float64_on_mps"] = bool(re.search(r'device\s*!=\s*torch\.device\("mps:0"\)', source))
    # Every place in torch's Python code that assigns `<x>.grad_scale =` or `<x>.found_inf =`.
    writers = []
    for name in sorted(wheel.names):
        if not name.endswith(".py") or not name.startswith("torch/") or "/testing/" in name:
            continue
        text = wheel.text(name)
        if text and re.search(r"^\s*\w+\.(?:grad_scale|found_inf)\s*=(?!=)", text, re.M):
            writers.append(name)
    facts["files_assigning_optimizer_grad_scale_or_found_inf"] = writers
    adam = wheel.text("torch/optim/adam.py") or ""
    facts["adam_step_reads_scaler_attributes"] = bool(
        re.search(r'getattr\(self,\s*"grad_scale",\s*None\)', adam)
        and re.search(r'getattr\(self,\s*"found_inf",\s*None\)', adam))
    adam_tree = ast.parse(adam) if adam else None
    adam_init = function_def(adam_tree, "__init__", cls="Adam") if adam_tree else None
    facts["adam_fused_sets_step_supports_amp_scaling"] = bool(
        adam_init is not None and "_step_supports_amp_scaling = True" in ast.unparse(adam_init))
    # Conclusion, from the three facts above: fused Adam/AdamW see a grad_scale/found_inf only when torch's
    # GradScaler.step() set them; a scaler that unscales in place and skips step() itself never does.
    facts["custom_scaler_without_step_is_unaffected"] = bool(
        facts["step_sets_optimizer_attributes"] == ["optimizer.found_inf", "optimizer.grad_scale"]
        and facts["adam_step_reads_scaler_attributes"]
        and facts["files_assigning_optimizer_grad_scale_or_found_inf"] == [member])
    return facts


PEAK_RE = r"peak|^max_|memory_stats|^reset"


def analyse_mps_python_api(wheel: Wheel) -> dict:
    tree = wheel.tree("torch/mps/__init__.py")
    public = [n for n in module_functions(tree) if not n.startswith("_")]
    accel_tree = wheel.tree("torch/accelerator/memory.py")
    accel = [n for n in module_functions(accel_tree) if not n.startswith("_")]
    facts: dict[str, object] = {
        "torch_mps_functions": public,
        "torch_mps_peak_functions": [n for n in public if re.search(PEAK_RE, n)],
        "torch_accelerator_memory_functions": accel,
    }
    # what torch.mps.<memory function> calls
    calls = {}
    if tree is not None:
        for name in ("current_allocated_memory", "driver_allocated_memory", "recommended_max_memory",
                     "set_per_process_memory_fraction"):
            func = function_def(tree, name)
            if func is None:
                continue
            targets = sorted({ast.unparse(n.func) for n in ast.walk(func)
                              if isinstance(n, ast.Call) and "torch._C." in ast.unparse(n.func)})
            calls[name] = targets
    facts["torch_mps_calls"] = calls
    # set_per_process_memory_fraction's checks: each `if` test and the message it raises.
    checks = []
    func = function_def(tree, "set_per_process_memory_fraction") if tree else None
    if func is not None:
        for node in ast.walk(func):
            if isinstance(node, ast.If):
                for stmt in node.body:
                    if isinstance(stmt, ast.Raise) and isinstance(stmt.exc, ast.Call):
                        message = stmt.exc.args[0] if stmt.exc.args else None
                        checks.append({
                            "if": ast.unparse(node.test),
                            "raises": ast.unparse(stmt.exc.func),
                            "message": (message.value if isinstance(message, ast.Constant)
                                        else ast.unparse(message) if message is not None else None),
                        })
    facts["set_per_process_memory_fraction_checks"] = checks
    return facts


# ----------------------------------------------------------------------------------------------------------------
# libtorch_cpu / libc10
# ----------------------------------------------------------------------------------------------------------------

FLOOR_RE = re.compile(r"The MPS backend is supported on [Mm]ac[Oo][Ss] (\d+(?:\.\d+)*)\+\.?\s*")
BF16_TEXTS_RE = re.compile(r"^(?=.*(?:[Bb][Ff]loat16|BFloat16))(?=.*(?:MPS|[Mm]ac[Oo][Ss]))(?=.*support).*$")
FALLBACK_RE = re.compile(r"fall back to run on the CPU|PYTORCH_ENABLE_MPS_FALLBACK")


def refs_of(lib: MachO, pattern: str, kinds: tuple[str, ...]) -> list[str]:
    """The values of the given reference kinds in the functions matching `pattern`, first occurrence order."""
    seen, ordered = set(), []
    for _pc, kind, value in lib.references_of_all(pattern):
        if kind in kinds and value not in seen:
            seen.add(value)
            ordered.append(value)
    return ordered


# The macOS release whose MPSGraph first has each selector MPSDevice's constructor probes. This is Apple's SDK
# availability (MPSGraph RNN ops: 12.3, cumulative ops: 13.0, FFT ops: 14.0), not something read from the wheel.
SELECTOR_FIRST_MACOS = {
    "LSTMWithSourceTensor:recurrentWeight:inputWeight:bias:initState:initCell:descriptor:name:": "12.3",
    "cumulativeSumWithTensor:axis:name:": "13.0",
    "HermiteanToRealFFTWithTensor:axes:descriptor:name:": "14.0",
}


def analyse_floor(lib: MachO, strings: list[str]) -> dict:
    floor_texts = sorted({m.group(0).strip() for s in strings for m in [FLOOR_RE.search(s)] if m})
    versions = sorted({FLOOR_RE.search(t).group(1) for t in floor_texts}, key=Version)
    ctor = r"^__ZN2at3mps9MPSDeviceC2Ev"
    ctor_refs = lib.references_of_all(ctor)
    selectors_checked = [v for _pc, k, v in ctor_refs if k == "sel"]
    checks_selector = any(k == "call_sel" and v == "instancesRespondToSelector:" for _pc, k, v in ctor_refs)
    return {
        "floor_texts": floor_texts,
        "floor_macos": versions,
        "device_constructor": "at::mps::MPSDevice::MPSDevice()",
        "device_constructor_checks_mpsgraph_selector": checks_selector,
        "device_constructor_selectors": selectors_checked,
        # No device (torch.backends.mps.is_available() is False) below this macOS: the constructor returns early
        # when MPSGraph lacks the selector. None when the constructor probes no selector.
        "device_requires_macos": max((SELECTOR_FIRST_MACOS.get(sel, "unknown") for sel in selectors_checked),
                                     default=None) if checks_selector else None,
        "device_requires_macos_source": "MPSGraph SDK availability of the probed selector (not in the wheel)",
        "device_constructor_class_strings": [v for _pc, k, v in ctor_refs if k == "cfstr"],
    }


def analyse_allocator(lib: MachO, c10: MachO) -> dict:
    impl = r"^__ZN2at3mps13HeapAllocator20MPSHeapAllocatorImpl"
    facts: dict[str, object] = {}

    # alloc_buffer_block: the buffer size check and the out-of-memory errors
    abb = r"^__ZN2at3mps13HeapAllocator20MPSHeapAllocatorImpl18alloc_buffer_block"
    refs = lib.references_of_all(abb)
    strings = [v for _pc, k, v in refs if k == "str"]
    facts["alloc_buffer_block_selectors"] = sorted({v for _pc, k, v in refs if k == "call_sel"})
    facts["invalid_buffer_size_text"] = next((s for s in strings if s.startswith("Invalid buffer size")), None)
    ctor_selectors = sorted(set(refs_of(lib, impl + r"C2Ev", ("call_sel", "sel"))))
    facts["allocator_constructor_selectors"] = ctor_selectors
    # The buffer-size limit is a value the constructor took from Metal: maxBufferLength is the only
    # buffer-length selector the allocator constructor calls; alloc_buffer_block calls none itself.
    facts["invalid_buffer_size_limit_source"] = (
        "maxBufferLength" if "maxBufferLength" in ctor_selectors
        and "maxBufferLength" not in facts["alloc_buffer_block_selectors"]
        and "recommendedMaxWorkingSetSize" not in facts["alloc_buffer_block_selectors"] else None)

    # Out-of-memory messages: rebuilt from the torchCheckMsgImpl<...> instantiations alloc_buffer_block calls.
    # Their char[N] arguments are string literals of length N-1, taken from the literals the function loads after
    # the previous TORCH_CHECK failure call and before this one, in load order; std::string arguments are
    # format_size() results, the const char* one is the pool name ("shared" or "private", so those two literals are
    # not message pieces). `ambiguous_lengths` lists literal lengths with more than one candidate in the window.
    messages = []
    window: list[str] = []
    for _pc, kind, value in refs:
        if kind == "str":
            window.append(value)
            continue
        if kind not in ("call", "call_import") or "torchCheck" not in value:
            continue
        types = torch_check_arg_types(value) if "torchCheckMsgImpl" in value else None
        candidates = list(dict.fromkeys(window))
        window = []
        if not types:
            continue
        if "const char*" in types:
            candidates = [c for c in candidates if c not in ("shared", "private")]
        lengths = [int(m.group(1)) - 1 for t in types for m in [re.fullmatch(r"char\[(\d+)\]", t)] if m]
        ambiguous = sorted({n for n in lengths if sum(len(c) == n for c in candidates) > 1})
        used: set[str] = set()
        pieces = []
        ok = True
        for typ in types:
            match = re.fullmatch(r"char\[(\d+)\]", typ)
            if match:
                length = int(match.group(1)) - 1
                candidate = next((c for c in candidates if len(c) == length and c not in used), None)
                if candidate is None:
                    ok = False
                    break
                used.add(candidate)
                pieces.append(candidate)
            elif typ == "std::string":
                pieces.append("{size}")
            elif typ == "const char*":
                pieces.append("{pool}")
            else:
                pieces.append("{" + typ + "}")
        if ok and pieces and pieces[0].startswith("MPS backend out of memory"):
            messages.append({"argument_types": types, "template": "".join(pieces),
                             "ambiguous_lengths": ambiguous})
    messages.sort(key=lambda m: m["template"])
    facts["oom_messages"] = messages
    # Size units: the format_size function alloc_buffer_block calls, and the unit strings it references.
    format_fn = next((v for _pc, k, v in refs if k in ("call", "call_import") and "format_size" in v), None)
    units = None
    if format_fn:
        for source in (lib, c10):
            name = format_fn if format_fn in source.symbols else None
            if name:
                units = [v for _pc, k, v in source.references(name) if k == "str"]
                break
    facts["format_size_function"] = itanium_nested_name(format_fn) if format_fn else None
    facts["format_size_units"] = units

    # Watermarks
    facts["high_watermark_error"] = next((v for v in refs_of(lib, impl + r"21setHighWatermarkRatio", ("str",))
                                          if "watermark ratio" in v), None)
    facts["low_watermark_error"] = next((v for v in refs_of(lib, impl + r"20setLowWatermarkRatio", ("str",))
                                         if "watermark ratio" in v), None)
    facts["watermark_limit_selectors"] = sorted(set(
        refs_of(lib, impl + r"2[01]set(?:High|Low)WatermarkRatio", ("call_sel", "sel"))))
    facts["environment_variables"] = sorted(v for v in refs_of(lib, impl + r"14init_allocator", ("str",))
                                            if v.startswith("PYTORCH_"))
    facts["default_watermark_ratios"] = None  # compiled numeric constants, not strings: not read here
    # The selector behind "current allocated size": what the allocator compares against its limit
    # (alloc_buffer / get_free_buffer) and what torch.mps.driver_allocated_memory() returns.
    facts["limit_check_selectors"] = sorted(set(
        refs_of(lib, impl + r"(?:12alloc_buffer|15get_free_buffer)E", ("call_sel",))))
    facts["driver_allocated_memory_selectors"] = sorted(set(
        refs_of(lib, r"^__ZNK2at3mps12MPSAllocator24getDriverAllocatedMemory", ("call_sel",))))
    facts["current_allocated_memory_selectors"] = sorted(set(
        refs_of(lib, r"^__ZNK2at3mps12MPSAllocator25getCurrentAllocatedMemory", ("call_sel",))))
    facts["recommended_max_memory_selectors"] = sorted(set(
        refs_of(lib, r"^__ZNK2at3mps12MPSAllocator23getRecommendedMaxMemory", ("call_sel",))))
    facts["device_stats_symbols"] = sorted({itanium_nested_name(n) for n in lib.symbols
                                            if re.search(r"getDeviceStats|resetPeakStats", n)
                                            and "mps" in n})
    return facts


def analyse_sdpa(lib: MachO, metal_names: list[str]) -> dict:
    names = [n for n in metal_names if n.startswith("sdpa_vector")]
    # Kernel families without dtype and head size: sdpa_vector_float_64_64_masknone -> sdpa_vector_*_masknone
    families = sorted({re.sub(r"_(?:float|half|bfloat)_\d+(?:_\d+)?", "_*", n) for n in names})
    head_sizes = sorted({int(m.group(1)) for n in names for m in [re.search(r"_(?:float|half|bfloat)_(\d+)", n)] if m})
    # The Metal C++ parameter list of the one-pass kernel template sdpa_vector<T, D, V, ...>, from its mangled
    # name inside the metallib (template arguments removed).
    signatures = set()
    for segname, sectname, _addr, size, fileoff, _r1, _r2 in lib.sections:
        if segname != "__TEXT" or sectname.startswith("__") or not fileoff:
            continue
        blob = lib.data[fileoff:fileoff + size]
        for match in re.finditer(rb"_ZZ11sdpa_vectorI[A-Za-z0-9_]*?Ev(PU9MTLdevice[A-Za-z0-9_]*?jj)E7outputs", blob):
            signatures.add(match.group(1).decode())
    return {
        "kernel_count": len(names),
        "kernel_families": families,
        "head_sizes": head_sizes,
        "one_pass_parameter_manglings": sorted(signatures),
    }


def analyse_release(version: Version, wheel_path: Path) -> dict:
    wheel = Wheel(wheel_path)
    work = WORK_DIR / str(version)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        cpu = MachO(wheel.extract(LIB_CPU, work))
        c10 = MachO(wheel.extract(LIB_C10, work))
        try:
            return extract_facts(version, wheel, cpu, c10)
        finally:
            cpu.close()
            c10.close()
    finally:
        shutil.rmtree(work)


def regex_literal(text: str) -> str:
    """`text` as a regular expression matching itself (only regex metacharacters escaped)."""
    return re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text)


def extract_facts(version: Version, wheel: Wheel, cpu: MachO, c10: MachO) -> dict:
    filename = wheel.path.name
    wheel_meta = next((n for n in wheel.names if re.fullmatch(r"torch-[^/]+\.dist-info/WHEEL", n)), None)
    meta_tags = sorted(re.findall(r"^Tag: (\S+)$", wheel.text(wheel_meta) or "", re.M)) if wheel_meta else []
    cpu_strings = cpu.cstrings()
    c10_strings = c10.cstrings()
    metal_names = metal_function_names(cpu)

    autocast_key = "AutocastMPS" in c10_strings
    facts = {
        "release": f"{version.major}.{version.minor}",
        "version": str(version),
        "wheel": {
            "file": filename,
            "sha256": sha256_of(wheel.path),
            "platform_tag": filename[:-4].split("-")[-1],
            "metadata_tags": meta_tags,
            "libtorch_cpu_build_version": cpu.build_version,
            "libc10_build_version": c10.build_version,
        },
        "mps_floor": analyse_floor(cpu, cpu_strings),
        "metal_libraries": metal_libraries(cpu),
        "autocast": dict(analyse_autocast(wheel, autocast_key), autocast_mps_dispatch_key_in_libc10=autocast_key),
        "mps_memory_api": analyse_mps_python_api(wheel),
        "optimizers": analyse_foreach_and_fused(wheel, cpu),
        "allocator": analyse_allocator(cpu, c10),
        "bf16": {
            "texts": sorted({s.strip() for s in cpu_strings if BF16_TEXTS_RE.match(s)}),
        },
        "sdpa_vector": analyse_sdpa(cpu, metal_names),
        "grad_scaler": analyse_grad_scaler(wheel),
        "cpu_fallback": {
            "environment_variable_present": "PYTORCH_ENABLE_MPS_FALLBACK" in cpu_strings,
            "warning_pieces": refs_of(cpu, r"^__ZZN2atL12mps_fallback|mps_fallbackERKNS_14OperatorHandle", ("str",)),
            "error_pieces": refs_of(cpu, r"mps_error_fallbackERKNS_14OperatorHandle", ("str",)),
        },
    }
    fallback = facts["cpu_fallback"]
    # Keep the message pieces: from "The operator '" on, without the strings of inlined helpers (schema lookups,
    # assertions, map lookups, source paths, function names).
    for key in ("warning_pieces", "error_pieces"):
        pieces = fallback[key]
        start = next((i for i, p in enumerate(pieces) if p.startswith("The operator '")), len(pieces))
        fallback[key] = [p for p in pieces[start:] if not re.search(
            r"^mps_(?:error_)?fallback$|^operator\(\)$|^schema$|^Tried to access the schema for $|"
            r"^ which doesn't have a schema registered yet$|^/Users/|^COMMIT_SHA$|INTERNAL ASSERT|^map::at", p)]
    warning = fallback["warning_pieces"]
    # The warning is "The operator '" + op name + the remaining pieces, in order.
    fallback["warning_template"] = (warning[0] + "{op}" + "".join(warning[1:])
                                    if warning and warning[0].endswith("'") else None)
    fallback["warning_regex"] = (regex_literal(warning[0]) + "(?P<op>.+?)" + regex_literal("".join(warning[1:3]).rstrip())
                                 if len(warning) >= 3 and warning[0].endswith("'") else None)
    return facts


# ----------------------------------------------------------------------------------------------------------------
# Summary and output
# ----------------------------------------------------------------------------------------------------------------

def summarise(releases: list[dict]) -> dict:
    """One compact row per release: the values the capability table needs, each copied from the full record."""
    rows = []
    for r in releases:
        ac, alloc = r["autocast"], r["allocator"]
        rows.append({
            "release": r["release"],
            "version": r["version"],
            "platform_tag": r["wheel"]["platform_tag"],
            "dylib_minos": (r["wheel"]["libtorch_cpu_build_version"] or {}).get("minos"),
            "mps_floor_macos": r["mps_floor"]["floor_macos"],
            "device_requires_macos": r["mps_floor"]["device_requires_macos"],
            "device_constructor_selectors": r["mps_floor"]["device_constructor_selectors"],
            "autocast_mps_accepted": ac.get("mps_device_accepted"),
            "autocast_mps_raises_when_disabled": ac.get("mps_raises_when_disabled"),
            "autocast_mps_warns_when_disabled": ac.get("mps_warns_when_disabled"),
            "autocast_mps_dtypes": ac.get("mps_accepted_dtypes"),
            "autocast_fp32_warning": ac.get("fp32_warning"),
            "autocast_bf16_below_macos14_check": ac.get("bf16_below_macos14_check"),
            "mps_in_foreach_devices": r["optimizers"]["mps_in_foreach_supported_devices"],
            "fused_adam_on_mps": r["optimizers"]["fused_true_accepted_on_mps"],
            "oom_units": alloc["format_size_units"],
            "invalid_buffer_size_limit_source": alloc["invalid_buffer_size_limit_source"],
            "driver_allocated_memory_selectors": alloc["driver_allocated_memory_selectors"],
            "limit_check_selectors": alloc["limit_check_selectors"],
            "device_stats": bool(alloc["device_stats_symbols"]),
            "torch_mps_peak_functions": r["mps_memory_api"]["torch_mps_peak_functions"],
            "torch_accelerator_max_memory_allocated": (
                "max_memory_allocated" in r["mps_memory_api"]["torch_accelerator_memory_functions"]),
            "sdpa_vector_kernels": r["sdpa_vector"]["kernel_count"],
            "grad_scaler_unscale_avoids_float64_on_mps": r["grad_scaler"].get("unscale_avoids_float64_on_mps"),
            "custom_scaler_without_step_is_unaffected": r["grad_scaler"].get(
                "custom_scaler_without_step_is_unaffected"),
        })
    return {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cached-only", action="store_true",
                        help="do not ask the package index; use the newest cached wheel of each minor release")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    chosen = select_wheels(args.cached_only)
    if not chosen:
        print("no wheels", file=sys.stderr)
        return 1
    releases = []
    for version, wheel in chosen:
        print(f"torch {version}: {wheel.name}", flush=True)
        releases.append(analyse_release(version, wheel))
    if WORK_DIR.exists() and not any(WORK_DIR.iterdir()):
        WORK_DIR.rmdir()
    document = {
        "schema_version": SCHEMA_VERSION,
        "generated_by": "evidence/extract.py",
        "query": {"python_version": PYTHON_VERSION, "platform_tags": list(PLATFORM_TAGS),
                  "first_release": str(FIRST_RELEASE), "policy": "newest patch release of each minor release"},
        "releases": releases,
        "patterns": {
            "mps_floor_text": FLOOR_RE.pattern,
            "bf16_texts": BF16_TEXTS_RE.pattern,
            "torch_mps_peak_functions": PEAK_RE,
            "device_stats_symbols": r"getDeviceStats|resetPeakStats",
            "sdpa_vector_kernel_names": r"^sdpa_vector",
            "mps_fused_adam_kernels": r"_fused_adamw?_kernel_mps_",
        },
        "summary": summarise(releases),
    }
    text = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output} "
          f"({len(releases)} releases)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
