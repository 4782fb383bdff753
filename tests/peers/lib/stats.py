#!/usr/bin/env python3
"""Turn `vdpactl stats --json` (stdin) into shell assignments for one port.

Usage: stats.py [--port ID] [--prefix P]

Prints, for the port (default: the only one), lines a test can eval:
  P_device='...'  P_queues=N
  and per queue I:  P_qI_dir  P_qI_mode  P_qI_packets  P_qI_bytes  P_qI_faults  P_qI_error
                    P_qI_interrupts  P_qI_doorbells  P_qI_drops (sum of all reasons)
                    P_qI_drop_REASON (noBuffer, bufferTooSmall, frameTooLarge, runt, linkError, badHeader, badOffload)
Missing numbers print as 0 so arithmetic works, but a missing key is reported on stderr.
Exit 1 when the JSON is not an ok stats reply or the port is missing.
"""
import argparse
import json
import re
import shlex
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port")
    ap.add_argument("--prefix", default="s")
    a = ap.parse_args()
    try:
        doc = json.load(sys.stdin)
    except ValueError as e:
        print(f"stats.py: not JSON: {e}", file=sys.stderr)
        return 1
    if not isinstance(doc, dict) or doc.get("ok") is not True or not isinstance(doc.get("ports"), list):
        print(f"stats.py: not an ok stats reply: {str(doc)[:300]}", file=sys.stderr)
        return 1
    ports = doc["ports"]
    if a.port is None:
        if len(ports) != 1:
            print(f"stats.py: {len(ports)} ports; say --port", file=sys.stderr)
            return 1
        port = ports[0]
    else:
        found = [p for p in ports if p.get("id") == a.port]
        if not found:
            print(f"stats.py: no port {a.port} in {[p.get('id') for p in ports]}", file=sys.stderr)
            return 1
        port = found[0]
    p = a.prefix
    out = [f"{p}_device={shlex.quote(str(port.get('device', '')))}"]
    queues = port.get("queues") or []
    out.append(f"{p}_queues={len(queues)}")
    for q in queues:
        i = q.get("index")
        if not isinstance(i, int):
            print(f"stats.py: queue without an index: {q}", file=sys.stderr)
            return 1

        def num(key, src=q):
            v = src.get(key)
            if not isinstance(v, int):
                print(f"stats.py: queue {i}: '{key}' missing or not a number ({v!r})", file=sys.stderr)
                return 0
            return v

        out.append(f"{p}_q{i}_dir={shlex.quote(str(q.get('direction', '')))}")
        out.append(f"{p}_q{i}_mode={shlex.quote(str(q.get('mode', '')))}")
        for key in ("packets", "bytes", "faults", "interrupts", "doorbells"):
            out.append(f"{p}_q{i}_{key}={num(key)}")
        err = q.get("error")
        out.append(f"{p}_q{i}_error={shlex.quote('' if err is None else str(err))}")
        drops = q.get("drops") or {}
        total = 0
        for reason in sorted(drops):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", reason):
                continue
            v = num(reason, drops)
            total += v
            out.append(f"{p}_q{i}_drop_{reason}={v}")
        out.append(f"{p}_q{i}_drops={total}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
