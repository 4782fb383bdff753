#!/usr/bin/env python3
"""One-shot TCP transfer ends for the peer tests (run inside a network namespace with
`ip netns exec NS python3 tcp.py ...`).

  tcp.py listen ADDR PORT OUTFILE [--timeout S]
      Accept one connection, write everything received until EOF to OUTFILE, then close.
      Prints "listening ADDR PORT" once bound, and at the end
      "received BYTES bytes md5 HEX in SECONDS s".
  tcp.py send ADDR PORT INFILE [--timeout S]
      Connect (retrying until the timeout while refused), send INFILE, shut down the
      sending side, wait for the peer to close. Prints "sent BYTES bytes in SECONDS s".

Exit 0 on success, 1 on error or timeout (default 60 s).
"""
import hashlib
import socket
import sys
import time

from peercli import take_option

def main() -> int:
    args = sys.argv[1:]
    timeout = take_option(args, "--timeout", 60.0)
    if len(args) != 4 or args[0] not in ("listen", "send"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, addr, port, path = args[0], args[1], int(args[2]), args[3]
    deadline = time.monotonic() + timeout
    if mode == "listen":
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(1)
        ls.settimeout(timeout)
        print(f"listening {addr} {port}", flush=True)
        try:
            c, peer = ls.accept()
        except socket.timeout:
            print("tcp.py: no connection before the timeout", file=sys.stderr)
            return 1
        t0 = time.monotonic()
        md5 = hashlib.md5()
        n = 0
        with open(path, "wb") as out:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    print(f"tcp.py: timeout after {n} bytes", file=sys.stderr)
                    return 1
                c.settimeout(left)
                try:
                    b = c.recv(65536)
                except socket.timeout:
                    continue
                if not b:
                    break
                out.write(b)
                md5.update(b)
                n += len(b)
        c.close()
        print(f"received {n} bytes md5 {md5.hexdigest()} in {time.monotonic() - t0:.3f} s from {peer[0]}", flush=True)
        return 0
    data = open(path, "rb").read()
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s.connect((addr, port))
            break
        except (ConnectionRefusedError, socket.timeout, OSError) as e:
            s.close()
            if time.monotonic() >= deadline:
                print(f"tcp.py: cannot connect to {addr}:{port}: {e}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    t0 = time.monotonic()
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while True:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            if not s.recv(65536):
                break
    except (socket.timeout, OSError) as e:
        print(f"tcp.py: send failed: {e}", file=sys.stderr)
        return 1
    s.close()
    print(f"sent {len(data)} bytes in {time.monotonic() - t0:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
