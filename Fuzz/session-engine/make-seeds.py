#!/usr/bin/env python3
"""Writes the session-engine target's seeds (Fuzz/session-engine/seeds/): programs in the input
language described in main.swift (an opcode byte, opcode % 22 selects the operation, then its
operands). Run it again after changing that language."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

VERSION_1 = 1 << 32
MRG_RXBUF = 1 << 15
EVENT_IDX = 1 << 29
INDIRECT = 1 << 28
PROTOCOL_FEATURES = 1 << 30
LOG_ALL = 1 << 26
BASE = VERSION_1 | MRG_RXBUF | EVENT_IDX | INDIRECT | PROTOCOL_FEATURES


def u8(v): return struct.pack("<B", v & 0xFF)
def u16(v): return struct.pack("<H", v & 0xFFFF)
def u32(v): return struct.pack("<I", v & 0xFFFFFFFF)
def u64(v): return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def set_features(f): return u8(0) + u64(f) + u8(1)
def set_protocol_features(f=0xFFFFFFFFFFFFFFFF): return u8(1) + u64(f) + u8(1)


def region(pages=16, gpa_slot=0, uva_slot=0, off_pages=0, flags=0):
    return u8(pages - 1) + u8(gpa_slot) + u8(uva_slot) + u8(off_pages) + u8(flags)


def set_mem_table(regions, drop_last=False):
    return u8(2) + u8(len(regions) - 1) + b"".join(regions) + u8(0xFF if drop_last else 0)


def set_log_base(extra=0, offset8=0): return u8(5) + u8(extra & 0x0F) + u8(offset8)
def vring_num(r, log2): return u8(6) + u8(r) + u8(log2)


def vring_addr(r, offset, region_sel=0, log=False):
    # mode bit 0: log flag; bit 1 clear: one well-formed layout at region + offset.
    out = u8(7) + u8(r) + u8(1 if log else 0) + u8(region_sel) + u16(offset)
    if log:
        out += u8(0)  # log address = the used ring's own guest address
    return out


def vring_base(r, base): return u8(8) + u8(r) + u8(0) + u16(base)
def get_vring_base(r): return u8(9) + u8(r)
def kick_fd(r): return u8(10) + u8(r) + u8(1)
def call_fd(r): return u8(11) + u8(r) + u8(1)
def enable(r, on=1): return u8(12) + u8(r) + u8(on)
def good_chain(r, mode, length, offset): return u8(20) + u8(r) + u8(mode) + u16(length - 14) + u16(offset)
def kick(r): return u8(21) + u8(r)


def descriptor(r, slot, region_sel, offset, length, flags, nxt):
    return u8(14) + u8(r) + u16(slot) + u8(region_sel) + u16(offset) + u8(0) + u16(length) + u8(flags) + u16(nxt)


def avail(r, heads):
    assert 1 <= len(heads) <= 4
    return u8(17) + u8(r) + u8(len(heads) - 1) + b"".join(u16(h) for h in heads)


def avail_idx(r, idx): return u8(17) + u8(r) + u8(0x80) + u16(idx)


def indirect_table(region_sel, offset, entries):
    out = u8(16) + u8(region_sel) + u16(offset) + u8(len(entries) - 1)
    for (sel, off, length, flags, nxt) in entries:
        out += u8(sel) + u16(off) + u16(length) + u8(flags) + u8(nxt)
    return out


def setup(features=BASE, ring_log2=8):
    p = set_features(features) + set_protocol_features() + set_mem_table([region()])
    for r, off in ((0, 0x0000), (1, 0x4000)):
        p += vring_num(r, ring_log2) + vring_addr(r, off) + vring_base(r, 0) + kick_fd(r) + call_fd(r) + enable(r)
    return p


def traffic(rx=4, tx=3, rx_off=0x8000, tx_off=0xC000):
    p = b""
    for k in range(rx):
        p += good_chain(0, k % 3, 1500, rx_off + k * 0x800)
    for k in range(tx):
        p += good_chain(1, k % 3, 60 + 40 * k, tx_off + k * 0x400)
    return p + kick(1)


seeds = {
    # The direct data path: loopback TX -> RX, three chain layouts, then both rings stopped.
    "direct-loopback": setup() + traffic() + get_vring_base(0) + get_vring_base(1),
    # A migration: log, LOG_ALL (RX to the relay), traffic, logging flag on the rings, traffic,
    # LOG_ALL off (back to direct), traffic, stop.
    "migration-relay": setup() + traffic() + set_log_base() + set_features(BASE | LOG_ALL)
    + vring_addr(0, 0x0000, log=True) + vring_addr(1, 0x4000, log=True) + traffic(rx_off=0x9000, tx_off=0xD000)
    + set_features(BASE) + traffic(rx_off=0xA000, tx_off=0xE000) + get_vring_base(0) + get_vring_base(1),
    # Logging on before the rings start: RX starts in relay mode.
    "log-before-start": set_features(BASE) + set_protocol_features() + set_mem_table([region()]) + set_log_base()
    + set_features(BASE | LOG_ALL) + b"".join(
        vring_num(r, 8) + vring_addr(r, off, log=True) + vring_base(r, 0) + kick_fd(r) + call_fd(r) + enable(r)
        for r, off in ((0, 0x0000), (1, 0x4000))) + traffic() + get_vring_base(0) + get_vring_base(1),
    # Hostile TX chains: a descriptor loop, then an indirect table pointing at itself, then an avail jump.
    "hostile-chains": setup() + descriptor(1, 0, 0, 0xC000, 100, 1, 1) + descriptor(1, 1, 0, 0xC100, 100, 1, 0)
    + avail(1, [0]) + kick(1)
    + indirect_table(0, 0xB000, [(0, 0xB000, 32, 4, 0), (0, 0xC000, 64, 0, 0)])
    + descriptor(1, 2, 0, 0xB000, 32, 4, 0) + avail(1, [2]) + kick(1) + avail_idx(1, 0x1234) + kick(1)
    + get_vring_base(1),
    # Two regions, rings in the second, memory table replaced while the rings run, then reset.
    "two-regions-replace": set_features(BASE) + set_protocol_features()
    + set_mem_table([region(gpa_slot=0, uva_slot=0), region(gpa_slot=2, uva_slot=3, off_pages=1)])
    + b"".join(vring_num(r, 6) + vring_addr(r, off, region_sel=1) + vring_base(r, 0) + kick_fd(r) + call_fd(r) + enable(r)
               for r, off in ((0, 0x0000), (1, 0x2000)))
    + traffic(rx=2, tx=2, rx_off=0x4000, tx_off=0x6000)
    + set_mem_table([region(gpa_slot=2, uva_slot=3, off_pages=1)]) + kick(1) + u8(13) + u8(2) + traffic(rx=1, tx=1),
}

def mediated_descriptor(r, slot, ring_of_mediated, byte_offset8, length, flags, nxt):
    # guestAddr selector 0xFE: the relay's mediated-ring IOVA of ring (off % 2), + 8 * the next byte.
    return (u8(14) + u8(r) + u16(slot) + u8(0xFE) + u16(ring_of_mediated) + u8(byte_offset8) + u8(0) + u16(length)
            + u8(flags) + u16(nxt))


# While RX is relayed, an RX buffer whose address is the mediated used ring's IOVA (the device's
# IOMMU maps it): the device writes the looped-back frame over the entries the relay reads.
seeds["rx-buffer-in-mediated-ring"] = (setup() + traffic() + set_log_base() + set_features(BASE | LOG_ALL)
    + mediated_descriptor(0, 20, 0, 0, 2048, 2, 0) + avail(0, [20])
    + good_chain(1, 0, 200, 0xD000) + kick(1) + good_chain(1, 0, 300, 0xD400) + kick(1)
    + set_features(BASE) + get_vring_base(0) + get_vring_base(1))

os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    print(f"{name}: {len(data)} bytes")
