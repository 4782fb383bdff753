#!/usr/bin/env python3
"""Frame sizes on one interface, as the kernel hands them to packet sockets (what tcpdump would
show, without needing tcpdump): run it in the interface's namespace with
`ip netns exec NS python3 framesizes.py IFNAME [--mtu-frame N]`.

It prints "capturing IFNAME" once its AF_PACKET socket is bound, counts IPv4 TCP frames until
SIGTERM or SIGINT, then prints one line per direction:

  in  frames N bytes B max M over K
  out frames N bytes B max M over K

"in" is what the interface received (on a TAP: what its reader, the device, wrote into it),
"out" what it sent (on a TAP: what the reader got to read). Lengths are whole Ethernet frames
without FCS; "over" counts frames longer than --mtu-frame (default 1514, an MTU-sized frame):
only GSO frames (TSO, GRO) are longer. Exit 0, or 1 if the socket cannot be opened.
"""
import socket
import sys

from peercli import StopFlag, take_option

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main() -> int:
    args = sys.argv[1:]
    limit = take_option(args, "--mtu-frame", 1514, int)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    ifname = args[0]
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ifname, 0))
    except OSError as e:
        print(f"framesizes.py: cannot capture on {ifname}: {e}", file=sys.stderr)
        return 1
    s.settimeout(0.2)
    stop = StopFlag()
    # [frames, bytes, max, over] per direction
    stats = {"in": [0, 0, 0, 0], "out": [0, 0, 0, 0]}
    print(f"capturing {ifname}", flush=True)
    while not stop:
        try:
            frame, addr = s.recvfrom(262144)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        # Ethernet, IPv4 (ethertype 0x0800), protocol 6 (TCP)
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        d = stats["out" if addr[2] == PACKET_OUTGOING else "in"]
        n = len(frame)
        d[0] += 1
        d[1] += n
        d[2] = max(d[2], n)
        if n > limit:
            d[3] += 1
    for k in ("in", "out"):
        f, b, m, o = stats[k]
        print(f"{k} frames {f} bytes {b} max {m} over {o}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
