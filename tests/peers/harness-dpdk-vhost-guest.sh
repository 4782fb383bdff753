#!/usr/bin/env bash
# Control for the test bed itself, no vdpad: the guest boots in QEMU against DPDK
# testpmd's vhost-user backend (net_vhost, frames looped back), loads virtio_net, brings
# eth0 up, and frames it sends come back (tx and rx counters grow). If this fails, the
# QEMU/DPDK/guest set-up is broken, not vdpad.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init harness-dpdk-vhost-guest 120
require_guest
require_testpmd

sock=$TMP/vhost.sock
start_testpmd_vhost vhost "$sock"
wait_for_socket "$sock" 30 vhost
t0=$SECONDS
start_qemu vm1 --socket "$sock" --connect --ip 10.0.2.15/24
wait_guest vm1 60
boot=$((SECONDS - t0))
out=$(guest_exec vm1 'ping -c 3 -W 1 10.0.2.2 >/dev/null 2>&1;
    echo "tx=$(cat /sys/class/net/eth0/statistics/tx_packets) rx=$(cat /sys/class/net/eth0/statistics/rx_packets)"') ||
    fail "guest command failed: $out"
[[ $out =~ tx=([0-9]+)\ rx=([0-9]+) ]] || fail "unexpected guest output: $out"
tx=${BASH_REMATCH[1]} rx=${BASH_REMATCH[2]}
((tx >= 3 && rx >= 3)) || fail "frames not looped back: guest $out"
stop_qemu vm1
alive vhost || fail "testpmd (vhost) exited"
pass "boot ${boot}s, guest $out"
