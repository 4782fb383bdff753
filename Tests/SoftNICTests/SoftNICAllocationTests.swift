#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import SoftNIC
import VDPA
import VhostUserFrontend
import Virtio
import XCTest

/// Steady state allocates nothing per packet.
///
/// Two measurements:
/// - in-process, the heap in use (glibc `mallinfo2()`: `uordblks + hblkhd`) before and after a
///   long run on a warm daemon must not grow by more than a fixed bound. This catches memory
///   that piles up per packet, not malloc/free pairs (a freed chunk does not stay "in use").
/// - in a child process with a small LD_PRELOAD library that counts calls to malloc, calloc,
///   realloc, posix_memalign, aligned_alloc and memalign made on the DMA engine's thread: the
///   count over the run must be a small constant, not a function of the packet count. This
///   catches per-packet malloc/free pairs too. Skipped when no C compiler is available.
final class SoftNICAllocationTests: SoftNICTestCase {
    static var packets: Int {
        ProcessInfo.processInfo.environment["SOFTNIC_ALLOC_PACKETS"].flatMap(Int.init) ?? 1_000_000
    }
    static let warmup = 100_000
    static let frameLength = 64

    // MARK: traffic

    /// Loopback traffic through both rings of `g` (RX ring 0, TX ring 1) for `packets` frames,
    /// in batches, with a driver loop that itself allocates nothing: every TX chain points at
    /// the same prepared frame, RX buffers cycle through a fixed pool. Kicks follow the
    /// notification-suppression protocol. Returns the number of frames received.
    final class LoopbackPump {
        let g: TestGuest
        let txGPA: UInt64
        let rxPool: UInt64
        let slots: Int
        static let slotSize = 2048
        let kickRX: Int32
        let kickTX: Int32

        init(_ g: TestGuest) {
            self.g = g
            txGPA = g.alloc(4096)
            g.write([UInt8](repeating: 0, count: netHeaderLength) + TestFrames.make(length: SoftNICAllocationTests.frameLength, seed: 1),
                    at: txGPA)
            slots = 2 * Int(g.ring(0).size)
            rxPool = g.alloc(UInt64(slots * Self.slotSize), align: 4096)
            kickRX = g.frontend.kickFD(ring: 0)!
            kickTX = g.frontend.kickFD(ring: 1)!
        }

        var posted = 0, sent = 0, received = 0, txDone = 0, badLength = 0

        func run(_ packets: Int, timeout: Double) throws -> Int {
            let rx = g.ring(0), tx = g.ring(1)
            let size = Int(rx.size)
            let goal = received + packets
            let deadline = MonotonicClock.nanoseconds + UInt64(timeout * 1e9)
            let expectedLength = UInt32(netHeaderLength + SoftNICAllocationTests.frameLength)
            let txBuffer = DriverBuffer(gpa: txGPA, length: expectedLength, isWritable: false)
            var idle = 0
            while received < goal {
                var progress = false
                var added = 0
                while posted - received < size && posted < goal {
                    let slot = posted % slots
                    rx.addChain(CollectionOfOne(DriverBuffer(gpa: rxPool + UInt64(slot * Self.slotSize), length: UInt32(Self.slotSize),
                                                             isWritable: true)))
                    posted += 1
                    added += 1
                }
                if added > 0 {
                    rx.publish()
                    if rx.kickNeeded() { EventFD.signal(kickRX) }
                    progress = true
                }
                added = 0
                // Never more frames in flight than RX buffers posted: loopback drops nothing.
                while sent < posted && tx.freeCount > 0 {
                    tx.addChain(CollectionOfOne(txBuffer))
                    sent += 1
                    added += 1
                }
                if added > 0 {
                    tx.publish()
                    if tx.kickNeeded() { EventFD.signal(kickTX) }
                    progress = true
                }
                while try tx.popUsed() != nil {
                    txDone += 1
                    progress = true
                }
                while let e = try rx.popUsed() {
                    if e.length != expectedLength { badLength += 1 }
                    received += 1
                    progress = true
                }
                if progress {
                    idle = 0
                } else {
                    idle += 1
                    if idle & 255 == 0 {
                        if MonotonicClock.nanoseconds > deadline { break }
                        sched_yield()
                    }
                }
            }
            return received
        }
    }

    // MARK: in-process: heap in use

    func testHeapInUseDoesNotGrowWithPacketCount() throws {
        #if arch(x86_64)
        guard let heapInUse = HeapProbe.heapInUse else { throw XCTSkip("mallinfo2 not found in the C library") }
        let (env, g) = try startedGuest("alloc0")
        let pump = LoopbackPump(g)
        XCTAssertEqual(try pump.run(Self.warmup, timeout: 30), Self.warmup, "warm-up traffic")
        // Let the counters settle, then measure around the long run.
        usleep(20_000)
        let before = heapInUse()
        let start = Date()
        let got = try pump.run(Self.packets, timeout: 60)
        let seconds = Date().timeIntervalSince(start)
        usleep(20_000)
        let after = heapInUse()
        let growth = Int64(after) - Int64(before)
        let measured = got - Self.warmup
        print("SoftNIC heap probe: \(measured) packets in \(String(format: "%.2f", seconds)) s "
              + "(\(Int(Double(measured) / seconds)) pps); heap in use \(before) → \(after) bytes (growth \(growth))")
        XCTAssertEqual(measured, Self.packets, "traffic stalled")
        XCTAssertEqual(pump.badLength, 0)
        XCTAssertLessThan(growth, 64 * 1024, "heap in use grew by \(growth) bytes over \(got) packets")
        let rx = env.queue("alloc0", 0), tx = env.queue("alloc0", 1)
        XCTAssertEqual(rx.drops.values.reduce(0, +), 0, "\(rx.drops)")
        XCTAssertEqual(tx.packets, UInt64(Self.warmup + Self.packets))
        XCTAssertTrue(waitUntil { env.queue("alloc0", 0).packets == UInt64(Self.warmup + Self.packets) })
        #else
        throw XCTSkip("the mallinfo2 probe calls it through the x86-64 struct-return convention")
        #endif
    }

    // MARK: child process: malloc calls on the engine thread

    /// Holds in debug builds too (0 calls over 1M packets): the engine's per-packet loops index
    /// their arrays rather than use `for ... in`, whose unspecialized IndexingIterator.next() at
    /// -Onone mallocs its coroutine frames (about 10 calls per packet when the loops were written so).
    func testEngineThreadMakesNoMallocCallsPerPacket() throws {
        let me = "SoftNICAllocationTests/" + ChildProcess.name(#function)
        if ChildProcess.isChild(me) {
            try countInChild()
            return
        }
        let (values, r) = try MallocCounter.runChild(test: me, resultVariable: "SOFTNIC_ALLOC_RESULT")
        XCTAssertTrue(r.succeeded, "\(r.summary); child output:\n\(r.excerpt)")
        guard let packets = values["packets"], let calls = values["engineAllocs"] else {
            XCTFail("the child wrote no result; output (tail):\n\(r.output.suffix(4000))")
            return
        }
        print("SoftNIC malloc probe: \(packets) packets, \(calls) allocation calls (\(values["engineBytes"] ?? -1) bytes) on the DMA engine thread")
        XCTAssertEqual(packets, Self.packets)
        // A per-packet allocation would show as >= `packets` calls; a constant few (say, a
        // control operation) would not. Zero is the design goal.
        if calls > 16 {
            // One sample per distinct call stack.
            var seen = Set<String>()
            let samples = r.output.components(separatedBy: "--- sample").dropFirst().filter { sample in
                let frames = sample.split(separator: "\n").dropFirst().map { $0.replacingOccurrences(of: #"\[0x[0-9a-f]+\]"#, with: "", options: .regularExpression) }
                return seen.insert(frames.joined(separator: "\n")).inserted
            }.prefix(4).map { "--- sample" + $0 }
            XCTFail("""
                the DMA engine thread called malloc \(calls) times over \(packets) packets \
                (\(String(format: "%.2f", Double(calls) / Double(packets))) per packet); first call sites:
                \(samples.map(MallocCounter.symbolize).joined())
                """)
        }
    }

    func countInChild() throws {
        guard let resultPath = ProcessInfo.processInfo.environment["SOFTNIC_ALLOC_RESULT"] else {
            throw XCTSkip("runs only as a child of its parent test")
        }
        typealias Track = @convention(c) (Int) -> Void
        typealias Count = @convention(c) () -> UInt
        typealias Samples = @convention(c) () -> Int32
        typealias PrintSample = @convention(c) (Int32, Int32) -> Void
        typealias SampleSize = @convention(c) (Int32) -> UInt
        func sym<T>(_ name: String, _: T.Type) throws -> T {
            guard let p = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else {
                throw XCTSkip("\(name) not found: LD_PRELOAD library missing")
            }
            return unsafeBitCast(p, to: T.self)
        }
        let track = try sym("softnic_alloc_track", Track.self)
        let count = try sym("softnic_alloc_count", Count.self)
        let bytes = try sym("softnic_alloc_bytes", Count.self)
        let samples = try sym("softnic_alloc_samples", Samples.self)
        let printSample = try sym("softnic_alloc_print_sample", PrintSample.self)
        let sampleSize = try sym("softnic_alloc_sample_size", SampleSize.self)

        let id = "al\(String(UInt16.random(in: 0...UInt16.max), radix: 36))"
        let (_, g) = try startedGuest(id)
        let pump = LoopbackPump(g)
        XCTAssertEqual(try pump.run(Self.warmup, timeout: 30), Self.warmup)
        guard let tid = MallocCounter.threadID(named: "dma-\(id)") else {
            XCTFail("no thread named dma-\(id)")
            return
        }
        track(tid)
        let got = try pump.run(Self.packets, timeout: 90) - Self.warmup
        let calls = count(), total = bytes()
        track(0)
        XCTAssertEqual(got, Self.packets)
        for i in 0..<samples() {
            print("--- sample \(i): \(sampleSize(i)) bytes")
            fflush(nil)
            printSample(i, 1)
        }
        try "packets=\(got)\nengineAllocs=\(calls)\nengineBytes=\(total)\n".write(toFile: resultPath, atomically: true, encoding: .utf8)
    }

}
