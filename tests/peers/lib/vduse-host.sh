# Sourced by the host side of the kernel-vDPA peer tests (tests/peers/vduse-*.sh), after
# lib/common.sh and peer_init: the binaries the guest needs, and one run of the guest script.

resolve_bins
RUNNER=${VDPA_GUEST_RUNNER:-$GUEST_DIR/run-vdpa-guest}
BIN=$(dirname "$VDPAD")
XCTEST=${XCTEST:-$BIN/swift-vdpaPackageTests.xctest}
BENCH=$BIN/vdpa-bench
GUEST_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/vduse-guest.sh
[[ -x $RUNNER ]] || fail "no guest runner $RUNNER (scripts/guest/run-vdpa-guest; run scripts/install-deps)"
for f in "$VDPAD" "$VDPACTL" "$XCTEST" "$BENCH"; do [[ -x $f ]] || fail "not built: $f (swift build --build-tests)"; done

# run_vduse_guest SECONDS STEP_REGEX: runs $TMP/guest.sh in the vDPA guest (1 GiB, the binaries
# and lib/vduse-guest.sh in its overlay), then passes, printing the STEP lines that match
# STEP_REGEX, or fails with the guest's FAIL-REASON and the tail of its output.
run_vduse_guest() {
    local secs=$1 steps=$2 out=$TMP/$TEST_NAME.output.log rc reason
    log "booting the vDPA guest"
    "$RUNNER" --name "$TEST_NAME" --log-dir "$TMP" --quiet --timeout "$secs" --mem 1024 \
        --env "VDPAD=$VDPAD" --env "VDPACTL=$VDPACTL" --env "XCTEST=$XCTEST" --env "BENCH=$BENCH" \
        --env "GUEST_LIB=$GUEST_LIB" \
        "$TMP/guest.sh" "$VDPAD" "$VDPACTL" "$XCTEST" "$BENCH" "$GUEST_LIB" > "$TMP/runner.log" 2>&1
    rc=$?
    [[ ${VDPA_VERBOSE:-0} == 1 && -r $out ]] && sed -n "s/^STEP /... $TEST_NAME: /p" "$out" | tr -d '\r' >&2
    if [[ $rc != 0 ]]; then
        reason=$(tr -d '\r' < "$out" 2>/dev/null | sed -n 's/^FAIL-REASON: //p' | head -n 1)
        [[ -n $reason ]] || reason="the guest run ended with status $rc: $(tail -n 5 "$TMP/runner.log" | tr '\n' ' ')"
        tail -n 80 "$out" >&2 2>/dev/null
        fail "$reason"
    fi
    tr -d '\r' < "$out" | sed -n "s/^STEP \\($steps\\)/  \\1/p"
    pass
}
