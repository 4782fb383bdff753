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
final class SoftNICAllocationTests: XCTestCase {
    var env: SoftNICTestDaemon?

    override func tearDown() {
        env?.stop()
        env = nil
    }

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
            let deadline = monotonicNanos() + UInt64(timeout * 1e9)
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
                        if monotonicNanos() > deadline { break }
                        sched_yield()
                    }
                }
            }
            return received
        }
    }

    func startLoopback(id: String) throws -> (SoftNICTestDaemon, TestGuest) {
        let env = try SoftNICTestDaemon([.init(id: id, link: "loopback")])
        self.env = env
        let g = try env.connect(id, features: Features.all)
        try g.startRing(0)
        try g.startRing(1)
        return (env, g)
    }

    // MARK: in-process: heap in use

    func testHeapInUseDoesNotGrowWithPacketCount() throws {
        #if arch(x86_64)
        guard let heapInUse = HeapProbe.heapInUse else { throw XCTSkip("mallinfo2 not found in the C library") }
        let (env, g) = try startLoopback(id: "alloc0")
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

    static let counterSource = #"""
        #define _GNU_SOURCE
        #include <stddef.h>
        #include <errno.h>
        #include <unistd.h>
        #include <sys/syscall.h>
        #include <stdatomic.h>
        #include <execinfo.h>

        extern void *__libc_malloc(size_t);
        extern void *__libc_calloc(size_t, size_t);
        extern void *__libc_realloc(void *, size_t);
        extern void *__libc_memalign(size_t, size_t);

        static _Atomic long tracked_tid;
        static _Atomic unsigned long tracked_count;
        static _Atomic unsigned long tracked_bytes;
        static __thread int my_tid __attribute__((tls_model("initial-exec")));
        static __thread int in_hook __attribute__((tls_model("initial-exec")));
        #define SAMPLES 16
        #define DEPTH 16
        static void *sample_frames[SAMPLES][DEPTH];
        static int sample_depth[SAMPLES];
        static size_t sample_size[SAMPLES];
        static _Atomic int sample_count;

        static inline void note(size_t size) {
            long t = atomic_load_explicit(&tracked_tid, memory_order_relaxed);
            if (!t) return;
            if (!my_tid) my_tid = (int)syscall(SYS_gettid);
            if (my_tid != t || in_hook) return;
            atomic_fetch_add_explicit(&tracked_count, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&tracked_bytes, size, memory_order_relaxed);
            int i = atomic_fetch_add_explicit(&sample_count, 1, memory_order_relaxed);
            if (i < SAMPLES) {
                in_hook = 1;
                sample_depth[i] = backtrace(sample_frames[i], DEPTH);
                sample_size[i] = size;
                in_hook = 0;
            }
        }

        void *malloc(size_t n) { note(n); return __libc_malloc(n); }
        void *calloc(size_t a, size_t b) { note(a * b); return __libc_calloc(a, b); }
        void *realloc(void *p, size_t n) { note(n); return __libc_realloc(p, n); }
        void *memalign(size_t a, size_t n) { note(n); return __libc_memalign(a, n); }
        void *aligned_alloc(size_t a, size_t n) { note(n); return __libc_memalign(a, n); }
        int posix_memalign(void **out, size_t a, size_t n) {
            if (a < sizeof(void *) || (a & (a - 1))) return EINVAL;
            note(n);
            void *p = __libc_memalign(a, n);
            if (!p) return ENOMEM;
            *out = p;
            return 0;
        }

        /* Starts counting calls made on thread `tid` (from zero); 0 stops counting. */
        void softnic_alloc_track(long tid) {
            if (tid) {
                atomic_store(&tracked_count, 0);
                atomic_store(&tracked_bytes, 0);
                atomic_store(&sample_count, 0);
            }
            atomic_store(&tracked_tid, tid);
        }
        unsigned long softnic_alloc_count(void) { return atomic_load(&tracked_count); }
        unsigned long softnic_alloc_bytes(void) { return atomic_load(&tracked_bytes); }
        int softnic_alloc_samples(void) { int n = atomic_load(&sample_count); return n < SAMPLES ? n : SAMPLES; }
        /* Writes sample i's frames (symbolized) to fd. */
        void softnic_alloc_print_sample(int i, int fd) {
            backtrace_symbols_fd(sample_frames[i], sample_depth[i], fd);
        }
        unsigned long softnic_alloc_sample_size(int i) { return sample_size[i]; }
        """#

    /// The counter library, built with the system C compiler.
    static func buildCounter(in dir: String) throws -> String {
        let cc = ["/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let cc else { throw XCTSkip("no C compiler to build the malloc-counting library") }
        let src = dir + "/count-malloc.c", lib = dir + "/count-malloc.so"
        try counterSource.write(toFile: src, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cc)
        p.arguments = ["-shared", "-fPIC", "-O2", "-o", lib, src]
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw XCTSkip("\(cc) could not build the malloc-counting library") }
        return lib
    }

    /// KNOWN FAILURE in debug builds (passes in release: 0 calls over 1M packets): at -Onone the
    /// engine's `for ... in` loops over `active` (run, sleep) and over DescriptorChain (gather,
    /// deliver) go through unspecialized IndexingIterator.next(), whose subscript-read coroutine
    /// frames are malloc'd: about 10 calls per packet.
    func testEngineThreadMakesNoMallocCallsPerPacket() throws {
        let me = "SoftNICAllocationTests/" + ChildProcess.name(#function)
        if ChildProcess.isChild(me) {
            try countInChild()
            return
        }
        let dir = NSTemporaryDirectory() + "softnic-alloc-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lib = try Self.buildCounter(in: dir)
        let resultPath = dir + "/result.txt"
        let r = try ChildProcess.run(test: me, environment: ["LD_PRELOAD": lib, "SOFTNIC_ALLOC_RESULT": resultPath], timeout: 120)
        XCTAssertTrue(r.succeeded, "\(r.summary); child output:\n\(r.excerpt)")
        let text = (try? String(contentsOfFile: resultPath, encoding: .utf8)) ?? ""
        var values: [String: Int] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            if kv.count == 2, let v = Int(kv[1]) { values[String(kv[0])] = v }
        }
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
                \(samples.map(Self.symbolize).joined())
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
        let (_, g) = try startLoopback(id: id)
        let pump = LoopbackPump(g)
        XCTAssertEqual(try pump.run(Self.warmup, timeout: 30), Self.warmup)
        guard let tid = Self.threadID(named: "dma-\(id)") else {
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

    /// Resolves "executable(+0xOFFSET)" frames of a backtrace_symbols text with addr2line and
    /// swift-demangle when they are installed; otherwise returns the text as it is.
    static func symbolize(_ text: String) -> String {
        guard let exe = ChildProcess.executable, FileManager.default.isExecutableFile(atPath: "/usr/bin/addr2line") else { return text }
        var out: [String] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            guard line.contains(URL(fileURLWithPath: exe).lastPathComponent), let open = line.range(of: "(+0x"),
                  let close = line[open.upperBound...].firstIndex(of: ")") else {
                out.append(String(line))
                continue
            }
            let offset = "0x" + line[open.upperBound..<close]
            var resolved = run("/usr/bin/addr2line", ["-f", "-e", exe, offset]).replacingOccurrences(of: "\n", with: " ")
            for demangler in ["/opt/swift/usr/bin/swift-demangle", "/usr/bin/swift-demangle"]
            where FileManager.default.isExecutableFile(atPath: demangler) {
                resolved = run(demangler, ["--simplified", resolved.split(separator: " ").first.map(String.init) ?? ""])
                    .trimmingCharacters(in: .whitespacesAndNewlines) + " " + (resolved.split(separator: " ").dropFirst().first ?? "")
                break
            }
            out.append("    " + resolved)
        }
        return out.joined(separator: "\n")
    }

    static func run(_ path: String, _ args: [String]) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        guard (try? p.run()) != nil else { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }

    /// The kernel thread id of this process's thread named `name` (prctl name, 15 bytes).
    static func threadID(named name: String) -> Int? {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        for t in tasks {
            let comm = (try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8)) ?? ""
            if comm.trimmingCharacters(in: .whitespacesAndNewlines) == String(name.prefix(15)) { return Int(t) }
        }
        return nil
    }
}

/// glibc's mallinfo2(), looked up at run time (Swift does not import <malloc.h>).
enum HeapProbe {
    /// Bytes in use: `uordblks` (allocated from arenas) + `hblkhd` (mmapped chunks).
    static let heapInUse: (@Sendable () -> Int)? = {
        #if arch(x86_64)
        // struct mallinfo2 is ten size_t fields, returned in memory: on x86-64 the caller passes
        // the destination in %rdi and gets it back in %rax, i.e. `void *mallinfo2(void *out)`.
        typealias F = @convention(c) (UnsafeMutableRawPointer) -> UnsafeMutableRawPointer?
        guard let p = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallinfo2") else { return nil }
        let f = unsafeBitCast(p, to: F.self)
        return {
            var fields = [Int](repeating: 0, count: 10)
            fields.withUnsafeMutableBytes { _ = f($0.baseAddress!) }
            // arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost
            return fields[7] + fields[4]
        }
        #else
        return nil
        #endif
    }()
}

@inline(__always) func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
