#!/usr/bin/env bash
# vdpad with a rate-limited source (link=source:size=64:rate=1000) against testpmd rxonly,
# watched over a window of about 4 s:
#   - the DMA engine sleeps between frames: a frame per millisecond leaves it idle most of
#     the time. Its thread ("dma-vdpa0") must block (voluntary context switches, i.e. sleeps
#     in epoll_wait) at least SOURCE_RATE_MIN_SLEEPS times a second (default 100), and
#     vdpad must use at most SOURCE_RATE_CPU_MAX % of a core (default 50). A spinning
#     engine shows ~0 sleeps a second and as much CPU as the scheduler gives it (on a loaded
#     machine that can be well under 100 %, which is why the sleeps are counted too);
#   - the rate roughly holds: delivered + dropped frames over the window are rate x window
#     within 25 % (the generator catches up in bursts after its thread was descheduled, so a
#     window can hold some frames that were due before it). Drops are reported: with testpmd
#     always reading, they only come from such catch-up bursts larger than the free buffers;
#   - at the end, as in testpmd-source: 0 <= vdpad RX - testpmd RX-packets <= ring size.
#
# Environment: SOURCE_RATE (default 1000 frames/s), SOURCE_RATE_CPU_MAX (default 50),
# SOURCE_RATE_MIN_SLEEPS (default 100 a second).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init testpmd-source-rate 120
require_testpmd

rate=${SOURCE_RATE:-1000}
cpu_max=${SOURCE_RATE_CPU_MAX:-50}
min_sleeps=${SOURCE_RATE_MIN_SLEEPS:-100}
sock=$TMP/vdpa0.sock
start_vdpad --port "socket=$sock,id=vdpa0,queues=1,link=source:size=64:rate=$rate"
wait_for_socket "$sock" 20 vdpad
wait_status 10 --port vdpa0 --connection listening

start_testpmd_app testpmd "$sock" 1 --forward-mode=rxonly --no-flush-rx
wait_status 45 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
ring_size=$(vdpa_status | python3 -c 'import json,sys; d=json.load(sys.stdin); print([q for q in d["ports"][0]["queues"] if q["index"]==0][0]["ringSize"])') ||
    fail "cannot read the RX ring size"
moving() { load_stats vdpa0 s; (($(qstat s 0 packets) > 0)); }
wait_until 20 "the source to deliver frames" moving
sleep 1

hz=$(getconf CLK_TCK)
tid=$(grep -lx 'dma-vdpa0' /proc/"${PIDS[vdpad]}"/task/*/comm 2>/dev/null | head -n 1 | cut -d/ -f5)
[[ -n $tid ]] || fail "no thread named dma-vdpa0 in vdpad (the DMA engine's thread)"
vsw() { sed -n 's/^voluntary_ctxt_switches:[[:space:]]*//p' "/proc/${PIDS[vdpad]}/task/$tid/status"; }
load_stats vdpa0 a
c0=$(cpu_ticks "${PIDS[vdpad]}") v0=$(vsw) w0=$(date +%s.%N)
sleep 4
load_stats vdpa0 b
c1=$(cpu_ticks "${PIDS[vdpad]}") v1=$(vsw) w1=$(date +%s.%N)
got=$(($(qstat b 0 packets) - $(qstat a 0 packets)))
drops=$(($(qstat b 0 drops) - $(qstat a 0 drops)))
measured=$(awk -v n="$((got + drops))" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", n / (b - a) }')
cpu=$(awk -v c="$((c1 - c0))" -v hz="$hz" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", 100 * c / hz / (b - a) }')
sleeps=$(awk -v n="$((v1 - v0))" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", n / (b - a) }')
log "rate $measured/s (asked $rate), drops $drops, vdpad CPU $cpu%, engine sleeps $sleeps/s"
alive testpmd || fail "testpmd exited during the traffic"

stop testpmd INT 20
rc=$?
((rc == 0)) || fail "testpmd exited with status $rc after SIGINT (expected a clean 0)"
testpmd_fwd_stats testpmd
wait_status 15 --port vdpa0 --connection listening
load_stats vdpa0 s
no_faults s
dev_rx=$(qstat s 0 packets)
diff=$((dev_rx - tp_rx))
summary="source rate $measured frames/s (asked $rate) over the window, drops $drops; vdpad CPU $cpu% of a core, DMA engine slept $sleeps times/s; testpmd RX $tp_rx, vdpad RX $dev_rx"

problems=()
awk -v m="$measured" -v r="$rate" 'BEGIN { exit !(m >= 0.75 * r && m <= 1.25 * r) }' ||
    problems+=("the source generated $measured frames/s, not $rate within 25 %")
((sleeps >= min_sleeps)) ||
    problems+=("the DMA engine slept $sleeps times/s (at least $min_sleeps expected) while generating $rate frames/s: it polls between frames instead of sleeping")
((cpu <= cpu_max)) ||
    problems+=("vdpad used $cpu% of a core to generate $rate frames/s (limit $cpu_max%)")
((diff >= 0 && diff <= ring_size)) || problems+=("vdpad RX - testpmd RX = $diff, outside 0..$ring_size")
((${#problems[@]} == 0)) || fail "$(printf '%s; ' "${problems[@]}")[$summary]"
pass "$summary"
