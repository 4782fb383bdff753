#!/usr/bin/env python3
"""Read the final forward statistics from a testpmd log (what it prints when forwarding
stops, e.g. on SIGINT) and print shell assignments:

  tp_rx=N tp_rx_dropped=N tp_tx=N tp_tx_dropped=N   (the last "Forward statistics for port P" block)
  tp_bye=1 when testpmd got as far as "Bye..." (a clean exit)

Usage: testpmd-stats.py LOG [--port P]. Exit 1 when there is no such block.

testpmd (22.11) takes these numbers as the port's counters (rte_eth_stats: ipackets,
opackets, imissed) minus their values when forwarding started, except TX-dropped, which
is the forwarding engine's count of frames that tx_burst did not accept (freed, never on the
ring). With --no-flush-rx nothing is read from the port before the snapshot.
"""
import re
import sys


def main() -> int:
    args = sys.argv[1:]
    port = "0"
    if "--port" in args:
        i = args.index("--port")
        port = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    text = open(args[0], "rb").read().decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    blocks = list(re.finditer(
        r"-+ Forward statistics for port " + re.escape(port) + r"\s+-+\s*\n(.*?)\n\s*-{20,}", text, re.S))
    if not blocks:
        print(f"testpmd-stats.py: no 'Forward statistics for port {port}' block in {args[0]}", file=sys.stderr)
        return 1
    body = blocks[-1].group(1)
    vals = {}
    for key, name in (("RX-packets", "tp_rx"), ("RX-dropped", "tp_rx_dropped"),
                      ("TX-packets", "tp_tx"), ("TX-dropped", "tp_tx_dropped")):
        m = re.search(re.escape(key) + r":\s*(\d+)", body)
        if not m:
            print(f"testpmd-stats.py: no {key} in the block: {body!r}", file=sys.stderr)
            return 1
        vals[name] = m.group(1)
    vals["tp_bye"] = "1" if "Bye..." in text else "0"
    print(" ".join(f"{k}={v}" for k, v in vals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
