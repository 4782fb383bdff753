#!/usr/bin/env bash
# Builds the session-engine libFuzzer target. Unlike the other two targets it cannot be one
# swiftc module: it needs VhostUser, VDPA (DeviceBinding), Relay and SoftNIC, which import
# swift-log and swift-atomics. So SwiftPM builds the library targets it needs, release,
# instrumented for libFuzzer and ASan and with
# `-enable-testing` (the harness reaches DeviceBinding, the relay's step and the engine through
# `@testable import`), into its own scratch path .build-fuzz-spm; then swiftc compiles the
# harness's files (main.swift and the files it names) against those modules and links them with
# their object files.
# The sanitizers go in as one `-Xswiftc -sanitize=fuzzer,address`: SwiftPM's
# `--sanitize=fuzzer --sanitize=address` passes two -sanitize= flags, swiftc keeps only the last,
# and the modules come out with ASan but without coverage counters (measured with Swift 6.3.1:
# 3,071 counters, all in the harness, instead of the whole data path).
#
#   Fuzz/session-engine/build.sh                 # build .build-fuzz/session-engine
#   Fuzz/session-engine/build.sh run [seconds]   # build, then fuzz (default 60 s) from the seeds
set -euo pipefail
cd "$(dirname "$0")/../.."

scratch=.build-fuzz-spm
# SoftNIC no longer depends on VDPA (it needs only the device framework): build both.
for t in VDPA SoftNIC; do
  swift build -c release --target "$t" --scratch-path "$scratch" \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -enable-testing
done
rel="$scratch/release"

# Object files of every module the SoftNIC target depends on (not tests, not executables).
objs=()
for m in CVDPAShims _AtomicsShims Platform Virtio Atomics Logging DeviceFramework VhostUser Relay VDPA SoftNIC; do
  while IFS= read -r -d '' o; do objs+=("$o"); done < <(find "$rel/$m.build" -name '*.o' -print0)
done

mkdir -p .build-fuzz
swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name SessionEngineFuzz -use-ld=lld \
  -I "$rel/Modules" \
  -Xcc -fmodule-map-file="$rel/CVDPAShims.build/module.modulemap" -Xcc -ISources/CVDPAShims/include \
  -Xcc -fmodule-map-file="$scratch/checkouts/swift-atomics/Sources/_AtomicsShims/include/module.modulemap" \
  Fuzz/session-engine/{main,Census,HarnessMemory,Run,RunFrontend,RunGuest}.swift "${objs[@]}" \
  -o .build-fuzz/session-engine
echo "built .build-fuzz/session-engine"

if [[ "${1:-}" == "run" ]]; then
  corpus=.build-fuzz/session-engine-corpus
  mkdir -p "$corpus" .build-fuzz/session-engine-crashes
  .build-fuzz/session-engine -max_total_time="${2:-60}" -print_final_stats=1 -rss_limit_mb=4096 \
    -artifact_prefix=.build-fuzz/session-engine-crashes/ "$corpus" Fuzz/session-engine/seeds
fi
