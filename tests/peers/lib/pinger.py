#!/usr/bin/env python3
"""Timestamped ICMP echo for the peer tests (root: a raw socket; run it inside the test's
network namespace with `ip netns exec NS python3 pinger.py ...`).

  pinger.py DEST [--interval S] [--duration S]

Sends one echo request to DEST every S seconds (default 0.005) for at most --duration
seconds (default 120; SIGTERM or SIGINT ends it earlier) and prints, one line each, flushed:
  "start ID"                                 once the socket is open (ID: ICMP identifier)
  "reply SEQ SENT RECEIVED"                  each echo reply from DEST with our identifier
                                             (SEQ: 32-bit request number from the payload;
                                             SENT, RECEIVED: CLOCK_REALTIME seconds, as
                                             `date +%s.%N`)
  "end sent N replies M duplicates D send_errors E"   at the end
A reply is matched on the identifier, the source address and the 32-bit sequence number
carried in the payload, so the 16-bit ICMP sequence wrapping does not matter. Send errors
(e.g. no route, a full queue while the link is down) are counted, not fatal.
"""
import os
import select
import socket
import struct
import sys
import time

from peercli import StopFlag, take_option


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def main() -> int:
    args = sys.argv[1:]
    interval = take_option(args, "--interval", 0.005)
    duration = take_option(args, "--duration", 120.0)
    if len(args) != 1 or interval <= 0 or duration <= 0:
        print(__doc__, file=sys.stderr)
        return 2
    dest = socket.gethostbyname(args[0])
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    stop = StopFlag()

    print(f"start {ident}", flush=True)
    sent = replies = duplicates = send_errors = 0
    seen = set()
    end = time.monotonic() + duration
    next_send = time.monotonic()
    while not stop and time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send:
            payload = struct.pack("!Id", sent, time.time())
            header = struct.pack("!BBHHH", 8, 0, 0, ident, sent & 0xFFFF)
            packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, sent & 0xFFFF) + payload
            try:
                sock.sendto(packet, (dest, 0))
            except OSError:
                send_errors += 1
            sent += 1
            next_send += interval
            if next_send < now:  # fell behind (scheduling): do not burst to catch up
                next_send = now + interval
            continue
        try:
            ready, _, _ = select.select([sock], [], [], max(0.0, next_send - now))
        except InterruptedError:
            continue
        if not ready:
            continue
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            received = time.time()
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if addr[0] != dest or len(icmp) < 8 + 12:
                continue
            kind, _code, _sum, rid, _rseq = struct.unpack("!BBHHH", icmp[:8])
            if kind != 0 or rid != ident:
                continue
            seq, sent_time = struct.unpack("!Id", icmp[8:20])
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            replies += 1
            print(f"reply {seq} {sent_time:.6f} {received:.6f}", flush=True)
    print(f"end sent {sent} replies {replies} duplicates {duplicates} send_errors {send_errors}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
