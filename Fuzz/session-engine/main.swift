// libFuzzer target: a BackendSession driving a SoftNIC (through the framework's DeviceBinding,
// relay included) fed a hostile frontend and a hostile guest at once. Built by
// Fuzz/session-engine/build.sh against SwiftPM-built, fuzzer-instrumented modules; never part of
// the package build.
//
// One input is a program: a sequence of operations, each an opcode byte and its operands (bytes
// past the end read as zero). Frontend operations are vhost-user requests, encoded with the codec
// and decoded again as the port does (so the fd-count layer runs too), then handled by the
// session, with memfds of fuzzed size and offset for memory tables and the log, and eventfds for
// kicks and calls. Guest operations write descriptor tables, indirect tables, avail entries and
// raw bytes into the guest memory the session mapped, through the harness's own mapping of the
// same memfds; addresses are mostly "region k + offset" so they land inside guest RAM, sometimes
// raw, sometimes in the relay's mediated-ring IOVA range. A kick signals the ring's kick eventfd
// and then settles the device: `SoftNIC.serviceUntilIdle()` runs the DMA engine's work on its own
// thread until it finds nothing to do, and the relay (if a migration switched a ring to it) is
// stepped until idle the same way, so each input ends in a settled state that depends on the
// input, not on thread timing (the engine thread still runs on its own in between, as it does in
// the daemon).
//
// Checked per input, besides ASan and Swift's traps: every reply carries the reply flag and the
// request it answers; a split ring's GET_VRING_BASE answer fits 16 bits; after teardown (session
// close, device close, relay stop) the process has exactly the fds and threads it had before the
// first input (a leak per iteration would exhaust a daemon that serves reconnecting frontends).
//
// Memfds are sometimes shorter than the region or log announced over them (FUZZ_SHORT_MEMFD=0
// turns that off). Before the fix in Platform's MemoryMapping the backend mapped such a region and
// the device's first access past the end of the file killed the process with SIGBUS
// (findings/short-memfd-sigbus, docs/TESTING.md); now the session must refuse the message.
//
// The target's files (Fuzz/session-engine/build.sh compiles them as one module): main.swift (this
// text, the input reader, the entry point and the leak check), Census.swift (this process's fds
// and threads), HarnessMemory.swift (the frontend's memfds and guest regions), Run.swift (one
// input's session, device and relay, and the program loop), RunFrontend.swift (vhost-user
// operations), RunGuest.swift (guest operations).

#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Logging
import Platform
@testable import Relay
@testable import SoftNIC
@testable import VDPA
import VhostUser
import Virtio

/// precondition's message is dropped in -O builds; the report must say which check failed.
func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError(message()) }
}

// MARK: input

struct Input {
    let p: UnsafePointer<UInt8>
    let n: Int
    var at = 0
    var done: Bool { at >= n }
    mutating func u8() -> UInt8 {
        guard at < n else { at += 1; return 0 }
        defer { at += 1 }
        return p[at]
    }
    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
}

// MARK: process-wide state

let allowShortMemfd = getenv("FUZZ_SHORT_MEMFD").map { String(cString: $0) != "0" } ?? true
/// Negative control for the leak check: FUZZ_SELFTEST_LEAK=1 leaks one eventfd per input, and
/// the target must then report "fd leak" on its first input (scripts/fuzz runs this once).
let selftestLeak = getenv("FUZZ_SELFTEST_LEAK").map { String(cString: $0) == "1" } ?? false
let verbose = getenv("FUZZ_VERBOSE").map { String(cString: $0) == "1" } ?? false
nonisolated(unsafe) var baseline: (fds: [String], threads: Int)?
nonisolated(unsafe) var iterations = 0

let logger: Logger = {
    var l = Logger(label: "fuzz")
    l.logLevel = verbose ? .trace : .critical
    return l
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    if baseline == nil {
        // A first run with no input starts whatever the runtime starts once (Dispatch's
        // semaphores, the SoftNIC's wire hub) before the fds and threads are counted.
        if let warm = try? Run() { warm.settle(); warm.teardown() }
        baseline = (ownFDs(), countEntries("/proc/self/task"))
    }
    do {
        let run = try Run()
        var input = Input(p: data, n: size)
        run.execute(&input)
        run.teardown()
    } catch {
        fatalError("cannot set up the device: \(error)")
    }
    iterations += 1
    if selftestLeak, let fd = try? EventFD.make() { _ = fd.take() }
    let fds = ownFDs()
    var threads = countEntries("/proc/self/task")
    // A joined thread can stay listed for a moment after pthread_join returns (the kernel clears
    // the joiner's futex before it reaps the task): give it up to 100 ms before calling it a leak.
    var waited = 0
    while let b = baseline, threads != b.threads, waited < 100 {
        usleep(1000)
        waited += 1
        threads = countEntries("/proc/self/task")
    }
    if let b = baseline {
        check(fds == b.fds, "fd leak (iteration \(iterations)): open after the input: \(fds); before the first: \(b.fds)")
        check(threads == b.threads, "thread leak: \(threads) threads after the input, \(b.threads) before the first: \(threadNames())")
    }
    return 0
}
