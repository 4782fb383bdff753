#!/usr/bin/env bash
# Builds the chain-walker libFuzzer target: main.swift compiled together with the Virtio sources
# it needs, as one module. Those files import only the standard library and Synchronization
# (ring atomics use Synchronization.Atomic over guest memory, not swift-atomics), so no
# SwiftPM-built module is needed. Keep them free of `import Platform` / `import Atomics`.
# lld instead of gold: gold prints a warning per ASan helper symbol ("Cannot export local symbol").
#
#   Fuzz/chain-walker/build.sh                 # build .build-fuzz/chain-walker
#   Fuzz/chain-walker/build.sh run [seconds]   # build, then fuzz (default 60 s) from the seeds
set -euo pipefail
cd "$(dirname "$0")/../.."

SOURCES=(
  Sources/Virtio/Features.swift
  Sources/Virtio/GuestMemoryAccess.swift
  Sources/Virtio/FlatGuestMemory.swift
  Sources/Virtio/RingWord.swift
  Sources/Virtio/SplitRingLayout.swift
  Sources/Virtio/VirtqDescriptor.swift
  Sources/Virtio/ChainError.swift
  Sources/Virtio/ChainWalk.swift
  Sources/Virtio/DescriptorChainWalker.swift
  Sources/Virtio/SplitQueue.swift
)

mkdir -p .build-fuzz
swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name VirtioFuzz -use-ld=lld \
  Fuzz/chain-walker/main.swift "${SOURCES[@]}" -o .build-fuzz/chain-walker
echo "built .build-fuzz/chain-walker"

if [[ "${1:-}" == "run" ]]; then
  corpus=.build-fuzz/chain-walker-corpus
  mkdir -p "$corpus" .build-fuzz/chain-walker-crashes
  .build-fuzz/chain-walker -max_total_time="${2:-60}" -print_final_stats=1 \
    -artifact_prefix=.build-fuzz/chain-walker-crashes/ "$corpus" Fuzz/chain-walker/seeds
fi
