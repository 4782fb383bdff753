#!/usr/bin/env bash
# vdpad (server, queues=1) against DPDK testpmd's virtio-user port as the vhost-user
# frontend: the port gets connected with VERSION_1 acked, memory regions and both rings
# (0 = rx, 1 = tx) sized and started; when testpmd stops the port listens again, and a
# second testpmd run negotiates as well.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init testpmd-negotiates 120
require_testpmd

sock=$TMP/vdpa0.sock
start_vdpad --port "socket=$sock,id=vdpa0,queues=1"
wait_for_socket "$sock" 20 vdpad
wait_status 10 --port vdpa0 --connection listening --role server --socket "$sock"

for run in 1 2; do
    start_testpmd_frontend "testpmd$run" "$sock" 1
    wait_status 45 --port vdpa0 --connection connected --feature-bit 32 --min-regions 1 \
        --ring 0 --ring 1
    summary=$STATUS_SUMMARY
    alive "testpmd$run" || fail "testpmd run $run exited while connected"
    stop "testpmd$run" INT 15 || true
    wait_status 15 --port vdpa0 --connection listening
    alive vdpad || fail "vdpad exited after testpmd run $run"
done
pass "$summary"
