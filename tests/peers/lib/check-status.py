#!/usr/bin/env python3
"""Check the JSON of `vdpactl status --json` (read on stdin) against expectations.

Exit 0 and print a one-line summary when every expectation holds; exit 1 and print the
first reason when one does not (the caller polls until it holds or times out).

Always checked: the object has "ok": true and a "ports" list; the selected port's hex
fields (features, protocolFeatures, memoryRegions) are strings "0x" + lowercase hex; acked
features are a subset of the offered ones.

Options:
  --port ID            the port to check (default: the only port)
  --connection STATE   connected | listening | connecting
  --role ROLE          server | client
  --socket PATH
  --feature-bit N      acked features include bit N (repeatable)
  --min-regions N      at least N memory regions, each with size > 0
  --ring INDEX         queue INDEX exists with ringSize > 0 and started true (repeatable)
  --ring-enabled       with --ring: enabled must be true as well
"""
import argparse
import json
import re
import sys

HEX = re.compile(r"^0x[0-9a-f]+$")


class Bad(Exception):
    pass


def hexval(obj, key, where):
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, str) or not HEX.match(v):
        raise Bad(f"{where}.{key} is {v!r}, not a lowercase 0x hex string")
    return int(v, 16)


def check(status, a):
    if not isinstance(status, dict) or status.get("ok") is not True:
        raise Bad(f'"ok" is not true: {json.dumps(status)[:300]}')
    ports = status.get("ports")
    if not isinstance(ports, list):
        raise Bad('"ports" is not a list')
    if a.port is None:
        if len(ports) != 1:
            raise Bad(f"expected exactly one port, found {len(ports)}")
        port = ports[0]
    else:
        matches = [p for p in ports if isinstance(p, dict) and p.get("id") == a.port]
        if not matches:
            raise Bad(f"no port {a.port!r} (ports: {[p.get('id') for p in ports if isinstance(p, dict)]})")
        port = matches[0]
    pid = port.get("id", "?")

    conn = port.get("connection")
    if a.connection and conn != a.connection:
        raise Bad(f"port {pid}: connection is {conn!r}, want {a.connection!r}")
    if a.role and port.get("role") != a.role:
        raise Bad(f"port {pid}: role is {port.get('role')!r}, want {a.role!r}")
    if a.socket and port.get("socket") != a.socket:
        raise Bad(f"port {pid}: socket is {port.get('socket')!r}, want {a.socket!r}")

    summary = [f"port {pid} {conn}"]
    for group in ("features", "protocolFeatures"):
        g = port.get(group)
        if not isinstance(g, dict):
            raise Bad(f"port {pid}: {group} is {g!r}, not an object")
        offered = hexval(g, "offered", f"{pid}.{group}")
        acked = hexval(g, "acked", f"{pid}.{group}")
        if acked & ~offered:
            raise Bad(f"port {pid}: {group} acked {acked:#x} has bits not offered ({offered:#x})")
        summary.append(f"{group}.acked={acked:#x}")
        if group == "features":
            for bit in a.feature_bit:
                if not acked >> bit & 1:
                    raise Bad(f"port {pid}: acked features {acked:#x} lack bit {bit}")

    regions = port.get("memoryRegions")
    if not isinstance(regions, list):
        raise Bad(f"port {pid}: memoryRegions is {regions!r}, not a list")
    for i, r in enumerate(regions):
        where = f"{pid}.memoryRegions[{i}]"
        for k in ("guestPhysAddr", "size", "userAddr", "mmapOffset"):
            hexval(r, k, where)
        if int(r["size"], 16) == 0:
            raise Bad(f"{where}.size is 0")
    if len(regions) < a.min_regions:
        raise Bad(f"port {pid}: {len(regions)} memory regions, want >= {a.min_regions}")
    summary.append(f"regions={len(regions)}")

    queues = port.get("queues")
    if not isinstance(queues, list):
        raise Bad(f"port {pid}: queues is {queues!r}, not a list")
    by_index = {q.get("index"): q for q in queues if isinstance(q, dict)}
    for idx in a.ring:
        q = by_index.get(idx)
        if q is None:
            raise Bad(f"port {pid}: no queue {idx} (have {sorted(k for k in by_index if isinstance(k, int))})")
        size = q.get("ringSize")
        if not isinstance(size, int) or size <= 0:
            raise Bad(f"port {pid}: queue {idx} ringSize is {size!r}")
        if q.get("started") is not True:
            raise Bad(f"port {pid}: queue {idx} not started ({json.dumps(q)})")
        if a.ring_enabled and q.get("enabled") is not True:
            raise Bad(f"port {pid}: queue {idx} not enabled ({json.dumps(q)})")
    if a.ring:
        summary.append("rings=" + ",".join(
            f"{i}:{by_index[i].get('ringSize')}{'' if by_index[i].get('enabled') else '(disabled)'}"
            for i in a.ring))
    return " ".join(summary)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port")
    ap.add_argument("--connection", choices=["connected", "listening", "connecting"])
    ap.add_argument("--role", choices=["server", "client"])
    ap.add_argument("--socket")
    ap.add_argument("--feature-bit", type=int, action="append", default=[])
    ap.add_argument("--min-regions", type=int, default=0)
    ap.add_argument("--ring", type=int, action="append", default=[])
    ap.add_argument("--ring-enabled", action="store_true")
    a = ap.parse_args()
    text = sys.stdin.read()
    try:
        status = json.loads(text)
    except ValueError as e:
        print(f"status is not one JSON object ({e}): {text[:200]!r}")
        return 1
    try:
        print(check(status, a))
    except Bad as e:
        print(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
