#!/usr/bin/env python3
"""The live-migration oracle: compare the source's and the destination's guest RAM files.

Usage: migration-oracle.py --src RAM --dst RAM [--journal FILE] [--vdpad-log FILE]
                           [--status FILE] [--rings FILE] [--mac MAC] [--vars FILE] [--detail N]

Run it once a migration has completed: the source is stopped and the destination (started
with -S) has not run, so the two RAM files (RAM file offset = guest-physical address for
the low RAM a small guest has) must be identical. It prints a report and, with --vars,
writes shell assignments (o_*) a test can source. Exit status: 0 when the journal check
holds, 1 when it does not, 2 on a usage or input error.

1. Journal check (--journal, vdpad's VDPAD_TEST_JOURNAL): each line
   `ring gpa length checksum marked publishIndex nanos` is a range the device wrote while
   dirty logging was on and the relay exposed to the guest. Every line must say marked=1.
   Where the source RAM still holds the journaled bytes (FNV-1a 64 of the source bytes equals
   the journal's checksum: "verified"), the destination bytes must equal the source bytes.
   Lines whose bytes the guest has overwritten since are "superseded" (reported, not judged).
   The check fails when a line says marked=0, a verified range differs, or no line exists.
   Also (with --vdpad-log): each ring's used index in the source RAM must equal the base its
   GET_VRING_BASE returned ("ring N stopped at B" in vdpad's log): nothing left in flight.

2. Whole-RAM comparison, 4 KiB pages. Each differing page is attributed by its differing
   bytes: "used-ring" (inside a vring's used ring: only the device side writes there),
   "device" (inside a journaled range whose journaled bytes the source still holds: a device
   write lost), "device-superseded" (inside a journaled range the guest has written since,
   e.g. zeroed on reuse: the guest's write was lost), "driver-ring" (a descriptor table or
   avail ring, written by the guest), else "neither" (guest-CPU data). The last three are
   QEMU's own losses (QEMU 7.2 under TCG, see /work/shared/TESTBED.md). "neither" pages whose source bytes look like the source link's
   frames (0xA5 filler, or the guest MAC followed by ethertype 0x88B5) are counted apart as
   "frame-like": device writes that no journal line covers.
   Among the "neither" pages, "frame-lost" ones are those where at least 64 of the differing
   bytes lie in a frame as the device writes it into an RX buffer (virtio-net header with
   num_buffers = 1 right before the link's frame) and are the link's 0xA5 filler on the source
   and something else on the destination: frame payload that no journal line covers is missing
   on the destination (an RX ring that ran direct, unlogged, while logging was on). The guest's
   own copies of frames have no such header, so QEMU's losses do not count. A test may fail
   on them.

   Every RX ring counts (0, 2, 4, ...: queue pairs beyond the first too): the journal figures
   are also given per ring (o_jlines_ringN, o_verified_ringN, o_jbad_ringN), the used rings
   of every ring are located, and each ring's used index is checked against its stop base.
   Ring addresses come from vdpad's trace log (SET_VRING_ADDR: log_guest_addr is the used
   ring's guest-physical address; desc/avail user addresses are translated with the memory
   regions of --status, a `vdpactl status --json` reply) and the ring sizes from --status.
   Or, for any backend (DPDK's too), from --rings: one line per ring
   `index size desc avail used last_avail_idx` (guest-physical addresses, hex or decimal), as
   QEMU's own `info virtio-queue-status` shows them on the stopped source; last_avail_idx is
   what the backend's GET_VRING_BASE returned, checked against the used index as above.

3. ICMP echo replies the backend wrote (for a backend without a journal, e.g. DPDK's vhost
   PMD answering the guest's pings in testpmd's icmpecho mode): in every differing page, each
   intact reply frame in an RX buffer of the source (a 12-byte virtio-net header with
   num_buffers = 1, the guest MAC, IPv4 with a valid header checksum, ICMP echo reply with a
   valid checksum over the whole message) is the backend's bytes as it wrote them (the guest
   does not write into a received frame, and a guest write over it would break a checksum).
   Differing bytes inside such a frame mean the destination lacks a device write: counted as
   "icmp-lost" pages (o_pages_icmp_lost). Frames whose checksums no longer hold are not judged.
"""
import argparse
import json
import os
import re
import sys
from bisect import bisect_right

PAGE = 4096
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1

try:
    import numpy as np
except ImportError:  # the pure-Python paths are slower, but give the same answers
    np = None


def fnv1a(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def fnv1a_many(mem, ranges):
    """FNV-1a 64 of mem[gpa:gpa+length] for each (gpa, length); returns a dict."""
    out = {}
    if np is None:
        for gpa, length in ranges:
            out[(gpa, length)] = fnv1a(bytes(mem[gpa:gpa + length]))
        return out
    by_len = {}
    for gpa, length in ranges:
        by_len.setdefault(length, []).append(gpa)
    prime = np.uint64(FNV_PRIME)
    for length, gpas in by_len.items():
        if length == 0:
            for g in gpas:
                out[(g, 0)] = FNV_OFFSET
            continue
        step = max(1, (16 << 20) // (8 * length))
        cols = np.arange(length, dtype=np.int64)
        for i in range(0, len(gpas), step):
            batch = np.asarray(gpas[i:i + step], dtype=np.int64)
            data = mem[batch[:, None] + cols[None, :]].astype(np.uint64)
            h = np.full(len(batch), FNV_OFFSET, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for k in range(length):
                    h ^= data[:, k]
                    h *= prime
            for g, v in zip(batch.tolist(), h.tolist()):
                out[(g, length)] = int(v)
    return out


class Intervals:
    """A union of [start, end) intervals (merged), for point queries."""

    def __init__(self, items):
        merged = []
        for s, e in sorted(items):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.items = merged
        self.starts = [s for s, _ in merged]

    def covers(self, addr):
        i = bisect_right(self.starts, addr) - 1
        return i >= 0 and addr < self.items[i][1]


def parse_journal(path):
    lines = []
    bad = 0
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        parts = raw.decode(errors="replace").split()
        try:
            ring, gpa, length, csum, marked, pub, ns = parts
            lines.append((int(ring), int(gpa, 16), int(length), int(csum, 16), int(marked), int(pub), int(ns)))
        except ValueError:
            bad += 1
    return lines, bad


ADDR_RE = re.compile(
    r"VringAddress\(index: (\d+), flags: (\d+), descUserAddr: (\d+), usedUserAddr: (\d+), "
    r"availUserAddr: (\d+), logGuestAddr: (\d+)\)")


STOPPED_RE = re.compile(r"ring (\d+) stopped at (\d+)")


def ring_areas(log_path, status_path):
    """[(start, end, label)] for each ring's desc table, avail ring and used ring."""
    if not log_path or not status_path:
        return [], "no --vdpad-log/--status: rings not located"
    try:
        with open(status_path) as f:
            status = json.load(f)
        port = status["ports"][0]
        regions = [(int(r["guestPhysAddr"], 16), int(r["size"], 16), int(r["userAddr"], 16))
                   for r in port["memoryRegions"]]
        sizes = {q["index"]: q["ringSize"] for q in port["queues"]}
    except (OSError, ValueError, KeyError, IndexError) as e:
        return [], f"status unreadable: {e}"
    addrs = {}
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = ADDR_RE.search(line)
                if m:
                    v = [int(x) for x in m.groups()]
                    addrs[v[0]] = v  # the last one wins
    except OSError as e:
        return [], f"vdpad log unreadable: {e}"
    if not addrs:
        return [], "no SET_VRING_ADDR in the vdpad log (not --log-level trace?)"

    def gpa_of(uaddr):
        for gpa, size, ua in regions:
            if ua <= uaddr < ua + size:
                return gpa + (uaddr - ua)
        return None

    areas = []
    notes = []
    for idx, (i, flags, desc_u, used_u, avail_u, log_gpa) in sorted(addrs.items()):
        n = sizes.get(idx, 0)
        if n <= 0:
            continue
        kind = "rx" if idx % 2 == 0 else "tx"
        used = gpa_of(used_u)
        if used is None:
            used = log_gpa
        areas.append((used, used + 6 + 8 * n, f"used-ring:{idx}({kind})"))
        d = gpa_of(desc_u)
        a = gpa_of(avail_u)
        if d is not None:
            areas.append((d, d + 16 * n, f"driver-ring:desc{idx}"))
        if a is not None:
            areas.append((a, a + 6 + 2 * n, f"driver-ring:avail{idx}"))
        notes.append(f"ring {idx} ({kind}, {n} entries): desc 0x{d or 0:x} avail 0x{a or 0:x} used 0x{used:x}")
    return areas, "; ".join(notes)


def rings_file(path):
    """([(start, end, label)], {ring: base}, note) from a --rings file."""
    areas, bases, notes = [], {}, []
    try:
        with open(path) as f:
            lines = [l.split() for l in f if l.strip() and not l.startswith("#")]
    except OSError as e:
        return [], {}, f"rings file unreadable: {e}"
    for parts in lines:
        try:
            idx, n, d, a, u = (int(x, 0) for x in parts[:5])
            base = int(parts[5], 0) if len(parts) > 5 else None
        except (ValueError, IndexError):
            return [], {}, f"bad line in the rings file: {' '.join(parts)}"
        kind = "rx" if idx % 2 == 0 else "tx"
        areas.append((u, u + 6 + 8 * n, f"used-ring:{idx}({kind})"))
        areas.append((d, d + 16 * n, f"driver-ring:desc{idx}"))
        areas.append((a, a + 6 + 2 * n, f"driver-ring:avail{idx}"))
        if base is not None:
            bases[idx] = base
        notes.append(f"ring {idx} ({kind}, {n} entries): desc 0x{d:x} avail 0x{a:x} used 0x{u:x}")
    if not areas:
        return [], {}, "rings file empty"
    return areas, bases, "; ".join(notes) + " (from --rings)"


def inet_ok(b: bytes) -> bool:
    """The Internet checksum over b (its checksum field included) holds."""
    if len(b) % 2:
        b += b"\0"
    t = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return t == 0xFFFF


def icmp_reply_bytes_lost(src, dst, base, offs, mac):
    """Differing bytes of page `base` inside an intact ICMP echo reply frame that the device
    wrote into an RX buffer of the source (see 3. in the module help)."""
    lo = max(0, base - 1600)
    win = bytes(src[lo:base + PAGE])
    frames = []
    i = win.find(mac)
    while i >= 0:
        ip = i + 14
        if (i >= 12 and win[i - 12:i] == VNET_HDR_ONE_BUFFER and win[i + 12:i + 14] == b"\x08\x00"
                and lo + ip + 28 <= len(src)):
            hdr = bytes(src[lo + ip:lo + ip + 20])
            tot = int.from_bytes(hdr[2:4], "big")
            if hdr[0] == 0x45 and hdr[9] == 1 and 28 <= tot <= 9000 and lo + ip + tot <= len(src) and inet_ok(hdr):
                icmp = bytes(src[lo + ip + 20:lo + ip + tot])
                if icmp[0] == 0 and icmp[1] == 0 and inet_ok(icmp):
                    frames.append((lo + i - 12, lo + ip + tot))
        i = win.find(mac, i + 1)
    if not frames:
        return 0
    return sum(1 for o in offs if any(s0 <= base + o < e0 for s0, e0 in frames))


def diff_pages(src, dst, size):
    """Indices of differing 4 KiB pages."""
    pages = []
    if np is not None:
        chunk = 16 << 20
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            n -= n % PAGE
            if n == 0:
                break
            a = src[off:off + n].reshape(-1, PAGE)
            b = dst[off:off + n].reshape(-1, PAGE)
            d = np.nonzero((a != b).any(axis=1))[0]
            pages.extend((off // PAGE + d).tolist())
        return pages
    chunk = 1 << 20
    for off in range(0, size, chunk):
        a = src[off:off + chunk]
        b = dst[off:off + chunk]
        if a == b:
            continue
        for p in range(0, len(a), PAGE):
            if a[p:p + PAGE] != b[p:p + PAGE]:
                pages.append((off + p) // PAGE)
    return pages


def byte_diffs(sp, dp):
    """Offsets (within the page) of the differing bytes."""
    return [i for i in range(len(sp)) if sp[i] != dp[i]]


def spans(offsets):
    out = []
    for o in offsets:
        if out and o == out[-1][1]:
            out[-1][1] = o + 1
        else:
            out.append([o, o + 1])
    return out


VNET_HDR_ONE_BUFFER = b"\0" * 10 + b"\x01\x00"  # virtio_net_hdr_mrg_rxbuf, num_buffers = 1


def device_frame_bytes_lost(src, dst, base, offs, mac):
    """Differing bytes of page `base` that lie in a frame as the device writes it into an RX
    buffer (a 12-byte virtio-net header with num_buffers = 1 right before the link's frame: guest
    MAC, then ethertype 0x88B5 at +12), hold the link's 0xA5 filler on the source and something
    else on the destination. The guest's own copies of frames (skb data) have no such header
    before them, so QEMU losing one of those does not count here."""
    lo = max(0, base - 1536)
    win = bytes(src[lo:base + PAGE])
    frames = []
    i = win.find(mac)
    while i >= 0:
        if i >= 12 and win[i - 12:i] == VNET_HDR_ONE_BUFFER and win[i + 12:i + 14] == b"\x88\xb5":
            frames.append((lo + i - 12, lo + i + 1536))
        i = win.find(mac, i + 1)
    if not frames:
        return 0
    n = 0
    for o in offs:
        g = base + o
        if src[g] == 0xA5 and dst[g] != 0xA5 and any(s0 <= g < e0 for s0, e0 in frames):
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--journal")
    ap.add_argument("--vdpad-log")
    ap.add_argument("--status")
    ap.add_argument("--rings", help="ring addresses (QEMU's view), see 2.")
    ap.add_argument("--mac", default="52:54:00:12:34:56")
    ap.add_argument("--vars")
    ap.add_argument("--detail", type=int, default=30, help="differing pages to describe (default 30)")
    a = ap.parse_args()

    try:
        size = os.path.getsize(a.src)
        if os.path.getsize(a.dst) != size:
            print(f"oracle: RAM files differ in size: {size} vs {os.path.getsize(a.dst)}", file=sys.stderr)
            return 2
        with open(a.src, "rb") as f:
            src_bytes = f.read()
        with open(a.dst, "rb") as f:
            dst_bytes = f.read()
    except OSError as e:
        print(f"oracle: {e}", file=sys.stderr)
        return 2
    if np is not None:
        src = np.frombuffer(src_bytes, dtype=np.uint8)
        dst = np.frombuffer(dst_bytes, dtype=np.uint8)
    else:
        src, dst = memoryview(src_bytes), memoryview(dst_bytes)

    out = {}
    report = []
    ok = True

    # ---- 1. journal --------------------------------------------------------------------------
    jlines, jbad = ([], 0)
    journal_iv = Intervals([])
    verified_iv = Intervals([])
    if a.journal:
        try:
            jlines, jbad = parse_journal(a.journal)
        except OSError as e:
            print(f"oracle: journal: {e}", file=sys.stderr)
            return 2
        outside = [l for l in jlines if l[1] + l[2] > size]
        inside = [l for l in jlines if l[1] + l[2] <= size]
        unmarked = [l for l in jlines if l[4] != 1]
        distinct = sorted({(l[1], l[2]) for l in inside})
        sums = fnv1a_many(src, distinct)
        verified = superseded = 0
        bad = []
        same_cache = {}
        for l in inside:
            key = (l[1], l[2])
            if sums[key] != l[3]:
                superseded += 1
                continue
            verified += 1
            if key not in same_cache:
                same_cache[key] = bytes(src[l[1]:l[1] + l[2]]) == bytes(dst[l[1]:l[1] + l[2]])
            if not same_cache[key]:
                bad.append(l)
        bad_ranges = sorted({(l[1], l[2]) for l in bad})
        per_ring = {}
        for l in jlines:
            per_ring.setdefault(l[0], [0, 0, 0, 0])[0] += 1
        for l in inside:
            if sums[(l[1], l[2])] == l[3]:
                per_ring[l[0]][1] += 1
        for l in bad:
            per_ring[l[0]][2] += 1
        for l in unmarked:
            per_ring[l[0]][3] += 1
        for r, (n, v, b, u) in per_ring.items():
            out[f"o_jlines_ring{r}"] = n
            out[f"o_verified_ring{r}"] = v
            out[f"o_jbad_ring{r}"] = b
            out[f"o_unmarked_ring{r}"] = u
        # What do ranges whose latest journaled bytes are gone hold now? A later overlapping
        # journaled write, an earlier journaled content, one of the link's frames that no line
        # journaled there (a device write the relay never exposed), or other (guest) bytes.
        mac = bytes(int(x, 16) for x in a.mac.split(":"))
        by_range = {}
        for l in inside:
            by_range.setdefault((l[1], l[2]), []).append(l)
        starts = sorted((l[1], l[1] + l[2], l[6]) for l in inside)
        sstarts = [x[0] for x in starts]
        fate = {"verified": 0, "overwritten-by-later-journaled-write": 0, "holds-earlier-journaled-bytes": 0,
                "holds-unjournaled-frame": 0, "zeroed": 0, "other-bytes": 0}
        unjournaled = []
        for key, ls in by_range.items():
            last = max(ls, key=lambda l: l[6])
            if sums[key] == last[3]:
                fate["verified"] += 1
                continue
            g, n = key
            later = False
            i = bisect_right(sstarts, g + n - 1) - 1
            while i >= 0 and starts[i][0] > g - 65536:
                s0, e0, t = starts[i]
                if e0 > g and s0 < g + n and t > last[6] and (s0, e0 - s0) != key:
                    later = True
                    break
                i -= 1
            if later:
                fate["overwritten-by-later-journaled-write"] += 1
            elif sums[key] in {l[3] for l in ls}:
                fate["holds-earlier-journaled-bytes"] += 1
            else:
                b = bytes(src[g:g + n])
                f = b.find(mac)
                if 0 <= f <= 16 and b[f + 12:f + 14] == b"\x88\xb5":
                    fate["holds-unjournaled-frame"] += 1
                    seq = int.from_bytes(b[f + 14:f + 22], "big")
                    unjournaled.append((g, n, f, seq, last[6]))
                elif not any(b):
                    fate["zeroed"] += 1  # the guest freed and reused the page (init_on_alloc)
                else:
                    fate["other-bytes"] += 1
        fate_lines = ["journal: distinct ranges by what the source holds now: "
                      + ", ".join(f"{k} {v}" for k, v in fate.items())]
        for g, n, f, seq, t in sorted(unjournaled, key=lambda x: x[3])[:5]:
            fate_lines.append(f"  unjournaled frame at 0x{g:x}+{n}: frame at +{f}, seq {seq >> 48}:{seq & 0xFFFFFFFFFFFF}, "
                          f"last journal line there at {t}")
        out.update(o_unjournaled_frames=len(unjournaled), o_ranges_other=fate["other-bytes"])
        rings_seen = sorted({l[0] for l in jlines})
        report.append(f"journal: {len(jlines)} lines (rings {rings_seen}), {len(distinct)} distinct ranges, "
                      f"{sum(l[2] for l in jlines)} bytes; marked=0: {len(unmarked)}; source still holds the "
                      f"bytes (verified): {verified}; superseded since: {superseded}; verified but different "
                      f"on the destination: {len(bad)} lines ({len(bad_ranges)} ranges)"
                      + (f"; unparsable lines: {jbad}" if jbad else "")
                      + (f"; outside the RAM file: {len(outside)}" if outside else ""))
        report.extend(fate_lines)
        report.append("journal per ring: " + "; ".join(
            f"ring {r}: {n} lines, {v} verified, {b} verified but different, {u} marked=0"
            for r, (n, v, b, u) in sorted(per_ring.items())))
        if jlines:
            t0 = min(l[6] for l in jlines)
            t1 = max(l[6] for l in jlines)
            report.append(f"journal: first to last line {(t1 - t0) / 1e6:.1f} ms")
        for gpa, length in bad_ranges[:10]:
            sb = bytes(src[gpa:gpa + length])
            db = bytes(dst[gpa:gpa + length])
            d = byte_diffs(sb, db)
            report.append(f"  DIFFERENT device range 0x{gpa:x}+{length}: {len(d)} bytes differ, first at +{d[0]}"
                          f" (src {sb[d[0]]:#04x} dst {db[d[0]]:#04x})")
        for l in unmarked[:3]:
            report.append(f"  marked=0: ring {l[0]} 0x{l[1]:x}+{l[2]}")
        if not jlines:
            report.append("journal: EMPTY: the relay exposed no device write while logging was on")
        if unmarked or bad or not jlines or outside or jbad:
            ok = False
        out.update(o_jlines=len(jlines), o_unmarked=len(unmarked), o_verified=verified,
                   o_superseded=superseded, o_jbad_lines=len(bad), o_jbad_ranges=len(bad_ranges),
                   o_jbytes=sum(l[2] for l in jlines))
        journal_iv = Intervals({(l[1], l[1] + l[2]) for l in jlines})
        verified_iv = Intervals({(g, g + n) for (g, n) in distinct if sums[(g, n)] in {l[3] for l in by_range[(g, n)]}})

    # ---- 2. whole RAM -----------------------------------------------------------------------
    rings_bases = {}
    if a.rings:
        areas, rings_bases, ring_note = rings_file(a.rings)
    else:
        areas, ring_note = ring_areas(a.vdpad_log, a.status)
    report.append(f"rings: {ring_note}")
    # Invariant 3: once GET_VRING_BASE has answered, every buffer the device took is completed:
    # the used index in guest RAM equals the base it returned.
    bases = {}
    if a.vdpad_log:
        try:
            with open(a.vdpad_log, errors="replace") as f:
                for line in f:
                    m = STOPPED_RE.search(line)
                    if m:
                        bases[int(m.group(1))] = int(m.group(2))
        except OSError:
            pass
    bases.update(rings_bases)  # QEMU's view (GET_VRING_BASE as QEMU recorded it) wins
    idx_bad = 0
    notes = []
    for s0, e0, lab in areas:
        if not lab.startswith("used-ring:"):
            continue
        ring = int(lab.split(":")[1].split("(")[0])
        used_idx = int.from_bytes(bytes(src[s0 + 2:s0 + 4]), "little")
        if ring in bases:
            same = used_idx == bases[ring] % 65536
            idx_bad += not same
            notes.append(f"ring {ring} GET_VRING_BASE {bases[ring]} used.idx {used_idx}" + ("" if same else " MISMATCH"))
    if notes:
        report.append("stop: " + "; ".join(notes))
    if idx_bad:
        ok = False
    out.update(o_idx_bad=idx_bad)
    pages = diff_pages(src, dst, size)
    mac = bytes(int(x, 16) for x in a.mac.split(":"))
    cats = {"used-ring": 0, "device": 0, "device-superseded": 0, "driver-ring": 0, "neither": 0}
    frame_like = 0
    frame_lost = 0
    icmp_lost = 0
    diff_bytes_total = 0
    details = []
    for p in pages:
        base = p * PAGE
        sp = bytes(src[base:base + PAGE])
        dp = bytes(dst[base:base + PAGE])
        offs = byte_diffs(sp, dp)
        diff_bytes_total += len(offs)
        labels = set()
        outside_all = 0
        for o in offs:
            g = base + o
            hit = False
            for s, e, lab in areas:
                if s <= g < e:
                    labels.add(lab)
                    hit = True
            if verified_iv.covers(g):
                labels.add("device")
                hit = True
            elif journal_iv.covers(g):
                labels.add("device-superseded")
                hit = True
            if not hit:
                outside_all += 1
        if any(l.startswith("used-ring") for l in labels):
            cat = "used-ring"
        elif "device" in labels:
            cat = "device"
        elif "device-superseded" in labels:
            cat = "device-superseded"
        elif any(l.startswith("driver-ring") for l in labels):
            cat = "driver-ring"
        else:
            cat = "neither"
        cats[cat] += 1
        frame = lost = False
        if cat == "neither":
            a5 = sum(1 for o in offs if sp[o] == 0xA5)
            hdr = False
            i = sp.find(mac)
            while i >= 0:
                if sp[i + 12:i + 14] == b"\x88\xb5":
                    hdr = True
                    break
                i = sp.find(mac, i + 1)
            frame = a5 >= 16 or hdr
            frame_like += frame
            lost = device_frame_bytes_lost(src, dst, base, offs, mac) >= 64
            frame_lost += lost
        ilost = cat != "used-ring" and icmp_reply_bytes_lost(src, dst, base, offs, mac) > 0
        icmp_lost += ilost
        if len(details) < a.detail:
            sp_list = spans(offs)
            shown = ", ".join(f"+0x{s:x}" + (f"..+0x{e - 1:x}" if e - s > 1 else "") for s, e in sp_list[:6])
            more = f" (+{len(sp_list) - 6} more spans)" if len(sp_list) > 6 else ""
            sample = sp_list[0][0]
            what = cat + (" frame-like" if frame else "") + (" FRAME-LOST" if cat == "neither" and lost else "") \
                + (" ICMP-REPLY-LOST" if ilost else "")
            if labels:
                what += " [" + ",".join(sorted(labels)) + "]"
            if outside_all and cat != "neither":
                what += f" (+{outside_all} bytes outside rings and journal)"
            details.append(f"  page 0x{base:x}: {len(offs)} bytes differ at {shown}{more}; {what}; "
                           f"first src {sp[sample:sample + 8].hex()} dst {dp[sample:sample + 8].hex()}")
    report.append(f"RAM: {size >> 20} MiB compared, {len(pages)} differing 4 KiB pages ({diff_bytes_total} bytes): "
                  f"used-ring {cats['used-ring']}, device (journaled bytes the source still holds) {cats['device']}, "
                  f"device-superseded (journaled range the guest wrote since) {cats['device-superseded']}, "
                  f"driver-ring {cats['driver-ring']}, neither {cats['neither']} (frame-like {frame_like}, "
                  f"frame payload lost outside the journal {frame_lost}); pages with bytes of an intact ICMP echo reply "
                  f"the destination lacks: {icmp_lost}")
    report.extend(details)
    if len(pages) > len(details):
        report.append(f"  ... {len(pages) - len(details)} more differing pages")
    out.update(o_pages=len(pages), o_page_bytes=diff_bytes_total, o_pages_used=cats["used-ring"],
               o_pages_device=cats["device"], o_pages_superseded=cats["device-superseded"],
               o_pages_driver=cats["driver-ring"], o_pages_neither=cats["neither"],
               o_pages_framelike=frame_like, o_pages_frame_lost=frame_lost, o_pages_icmp_lost=icmp_lost, o_journal_ok=int(ok), o_rings_located=int(bool(areas)))

    print("\n".join(report))
    if a.vars:
        with open(a.vars, "w") as f:
            for k, v in out.items():
                f.write(f"{k}={int(v)}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
