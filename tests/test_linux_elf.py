"""ELF loading: every unusable file is one ElfError line; static and static-pie load."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

from conftest import require_gcc32, unavailable
from tlslab.linux.elf import ElfError, load_elf, parse_elf
from tlslab.machine.vcpu import VCpu

GUEST = os.path.join(os.path.dirname(__file__), "..", "guests", "bin", "lsr")


def _one_line_error(path, match):
    with pytest.raises(ElfError, match=match) as info:
        parse_elf(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_not_elf(tmp_path):
    f = tmp_path / "random"
    f.write_bytes(bytes(range(256)) * 10)
    _one_line_error(f, "not an ELF")


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    _one_line_error(tmp_path / "empty", "not an ELF")
    _one_line_error(tmp_path / "missing", "No such file")


@pytest.mark.parametrize("size,match", [(30, "truncated ELF header"), (60, "malformed program headers"),
                                        (4096, "truncated: PT_LOAD")])
def test_truncated(tmp_path, size, match):
    if not os.path.exists(GUEST):
        unavailable("guests/bin/lsr is missing (it is committed: a broken checkout)")
    f = tmp_path / "trunc"
    f.write_bytes(open(GUEST, "rb").read()[:size])
    _one_line_error(f, match)


def test_elfclass64(tmp_path):
    f = tmp_path / "x64"
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    f.write_bytes(bytes(header))
    _one_line_error(f, "64-bit ELF")


def test_wrong_machine(tmp_path):
    f = tmp_path / "arm"
    header = bytearray(52)
    header[:7] = b"\x7fELF\x01\x01\x01"
    header[16:20] = (2).to_bytes(2, "little") + (40).to_bytes(2, "little")  # ET_EXEC, EM_ARM
    f.write_bytes(bytes(header))
    _one_line_error(f, "not i386")


def test_dynamic_elf(tmp_path):
    require_gcc32()
    src = tmp_path / "d.c"
    src.write_text("int main(void){return 0;}\n")
    subprocess.run(["gcc", "-m32", "-o", str(tmp_path / "dyn"), str(src)], check=True)
    _, image = parse_elf(tmp_path / "dyn")
    assert image.dynamic and image.interp == "/lib/ld-linux.so.2"
    assert image.needed == ("libc.so.6",)
    assert image.e_type == "ET_DYN" and image.load_bias == 0x400000 and not image.static_pie


def test_load_static_exec():
    if not os.path.exists(GUEST):
        unavailable("guests/bin/lsr is missing (it is committed: a broken checkout)")
    v = VCpu(checks=False)
    image = load_elf(v.mem, GUEST)
    assert not image.static_pie and image.load_bias == 0
    # AT_PHDR: the program header table as the file has it (e_phoff, e_phnum x 32 bytes), mapped at image.phdr
    with open(GUEST, "rb") as f:
        data = f.read()
    e_phoff, = struct.unpack_from("<I", data, 28)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    assert (image.phent, image.phnum) == (e_phentsize, e_phnum) == (32, e_phnum) and e_phnum > 0
    assert v.mem.read(image.phdr, 32 * e_phnum) == data[e_phoff:e_phoff + 32 * e_phnum]
    load0 = next(struct.unpack_from("<IIII", data, e_phoff + 32 * i) for i in range(e_phnum)
                 if struct.unpack_from("<I", data, e_phoff + 32 * i)[0] == 1)   # first PT_LOAD
    assert image.phdr == load0[2] - load0[1] + e_phoff                        # p_vaddr - p_offset + e_phoff
    assert image.brk_start % 4096 == 0
    assert image.tls is not None  # lsr has __thread variables
    assert v.mem.is_mapped(image.entry, 1)
    assert image.symbolize(image.symbols.address_of("main") + 0x12) == "main+0x12"
    assert image.symbolize(image.symbols.address_of("main")) == "main"
    # bss is zero and writable-mapped
    data = [s for s in image.segments if s.memsz > s.filesz]
    assert data and v.mem.read(data[0].vaddr + data[0].filesz, 16) == bytes(16)


def test_static_pie_is_loaded_at_fixed_base(tmp_path):
    require_gcc32()
    src = tmp_path / "p.c"
    src.write_text("int main(void){return 0;}\n")
    r = subprocess.run(["gcc", "-m32", "-static-pie", "-o", str(tmp_path / "pie"), str(src)], capture_output=True)
    if r.returncode:
        unavailable(f"gcc -m32 -static-pie does not work here: {r.stderr.decode()[-200:]}")
    _, image = parse_elf(tmp_path / "pie")
    assert image.static_pie and image.load_bias == 0x400000 and image.entry > 0x400000
