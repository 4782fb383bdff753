@testable import Relay
import VhostUser
import Virtio
import XCTest

/// The relay's walk of a completed chain (`WrittenBytesMarker`, on `ChainWalk`), over plain
/// memory: it marks `used.len` bytes of the writable buffers at their guest-physical addresses
/// without translating them, translates only the tables, and keeps what it marked when the chain
/// turns out broken.
final class RelayMarkingTests: XCTestCase {
    typealias D = VirtqDescriptor
    static let tablesGPA: UInt64 = 0x1_0000
    static let tableGPA: UInt64 = 0x1_0000
    static let indirectGPA: UInt64 = 0x1_2000
    /// Buffers far from the memory the walk may translate: nothing maps them here.
    static let bufferGPA: UInt64 = 0x5000_0000
    static let queueSize: UInt16 = 8

    /// Descriptor and indirect tables live here; nothing else is mapped.
    let tables = FlatGuestMemory(size: 0x1_0000, baseGPA: RelayMarkingTests.tablesGPA)
    /// A dirty log for 2 GiB of guest-physical space (64 KiB of bits).
    let logBits = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 8)
    var log: DirtyLog!

    override func setUp() {
        logBits.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
        log = DirtyLog(unownedBase: logBits, byteCount: 1 << 16)
    }

    override func tearDown() {
        log = nil
        logBits.deallocate()
    }

    var table: UnsafeMutableRawPointer { tables.pointer(gpa: Self.tableGPA, length: UInt64(Self.queueSize) * 16) }
    func set(_ index: UInt16, _ d: D) { d.store(to: table + Int(index) * 16) }
    func setIndirect(_ entries: [D]) {
        let p = tables.pointer(gpa: Self.indirectGPA, length: UInt64(entries.count) * 16)
        for (i, d) in entries.enumerated() { d.store(to: p + i * 16) }
    }
    static func page(_ gpa: UInt64) -> UInt64 { gpa >> 12 }
    func marked(_ range: ClosedRange<UInt64>) -> [UInt64] { range.filter { log.isMarked(page: $0) } }

    /// Marks the chain at `head` for `length` written bytes; returns the pages counted and the
    /// error the walk ended with, if any. The batch is flushed either way.
    func mark(head: UInt16 = 0, length: UInt32, granularity: LogGranularity = .exact) -> (pages: UInt64, error: ChainError?) {
        var marker = WrittenBytesMarker(batch: DirtyLog.Batch(log: log), granularity: granularity)
        var failure: ChainError?
        do throws(ChainError) {
            try marker.mark(head: head, length: length, table: table, queueSize: Self.queueSize, tables: tables)
        } catch {
            failure = error
        }
        marker.batch.flush()
        return (marker.pages, failure)
    }

    func testMarksGuestPhysicalAddressesOfWrittenBytesWithoutTranslatingBuffers() {
        let b = Self.bufferGPA
        set(0, D(addr: b, len: 100, flags: .next, next: 3))                            // readable: not marked
        set(3, D(addr: b + 0x1_0000, len: 0x2000, flags: [.write, .next], next: 5))     // 2 pages
        set(5, D(addr: b + 0x2_0000, len: 0x3000, flags: [.write, .next], next: 7))     // 0x800 of it written
        set(7, D(addr: 0, len: 0, flags: .next, next: 200))                            // never reached
        let r = mark(length: 0x2800)
        XCTAssertNil(r.error, "the walk ends once used.len bytes are marked, before the broken tail")
        XCTAssertEqual(r.pages, 3)
        let p = Self.page(b)
        XCTAssertEqual(marked(p...(p + 0x40)), [p + 0x10, p + 0x11, p + 0x20])
        // The device's walker translates buffers: the same chain is a fault for it.
        var device = DescriptorChainWalker(capacity: Self.queueSize, indirectAllowed: true)
        XCTAssertThrowsError(try device.walk(head: 0, table: table, queueSize: Self.queueSize, memory: tables)) {
            XCTAssertEqual($0 as? ChainError, .bufferOutOfRange(gpa: b, length: 100))
        }
    }

    func testIndirectTableIsTranslatedAndItsBuffersAreNot() {
        let b = Self.bufferGPA
        setIndirect([D(addr: b, len: 0x1000, flags: [.write, .next], next: 1), D(addr: b + 0x5000, len: 0x1000, flags: .write)])
        set(2, D(addr: Self.indirectGPA, len: 32, flags: .indirect))
        XCTAssertNil(mark(head: 2, length: 0x1001).error)
        let p = Self.page(b)
        XCTAssertEqual(marked(p...(p + 8)), [p, p + 5])
        // An indirect table outside the memory the tables translate through marks nothing.
        log = DirtyLog(unownedBase: logBits, byteCount: 1 << 16)
        logBits.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
        set(4, D(addr: b, len: 32, flags: .indirect))
        XCTAssertEqual(mark(head: 4, length: 0x1000).error, .indirectTableOutOfRange(gpa: b, length: 32))
        XCTAssertEqual(marked(p...(p + 8)), [])
    }

    /// The guest broke the chain after the device completed it: what was walked up to the break
    /// stays marked, and the break is reported (the relay counts it as an error of the ring).
    func testBrokenChainKeepsTheMarksUpToTheBreakAndReportsIt() {
        let b = Self.bufferGPA
        let p = Self.page(b)
        set(0, D(addr: b, len: 0x1000, flags: [.write, .next], next: 1))
        set(1, D(addr: b + 0x3000, len: 0x1000, flags: [.write, .next], next: 9))   // next out of range
        var r = mark(length: 0x3000)
        XCTAssertEqual(r.error, .nextOutOfRange(next: 9, tableSize: UInt32(Self.queueSize)))
        XCTAssertEqual(r.pages, 2)
        XCTAssertEqual(marked(p...(p + 8)), [p, p + 3])
        // A loop: each descriptor is walked at most once per table, then the walk stops.
        set(1, D(addr: b + 0x3000, len: 0x1000, flags: [.write, .next], next: 0))
        r = mark(length: 0xF000)
        XCTAssertEqual(r.error, .loop(index: 0, ttl: UInt32(Self.queueSize)))
        // Nested indirect and INDIRECT with NEXT are broken chains for the relay too.
        setIndirect([D(addr: Self.indirectGPA, len: 16, flags: .indirect)])
        set(6, D(addr: Self.indirectGPA, len: 16, flags: .indirect))
        XCTAssertEqual(mark(head: 6, length: 1).error, .nestedIndirect(index: 0))
        set(6, D(addr: Self.indirectGPA, len: 16, flags: [.indirect, .next], next: 1))
        XCTAssertEqual(mark(head: 6, length: 1).error, .indirectWithNext(index: 6))
    }

    /// More buffers than the queue size, through an indirect table: the walk stops at the limit.
    func testAtMostQueueSizeBuffers() {
        let b = Self.bufferGPA
        setIndirect((0..<9).map { i in D(addr: b + UInt64(i) * 0x1000, len: 0x1000, flags: i < 8 ? [.write, .next] : .write, next: UInt16(i + 1)) })
        set(0, D(addr: Self.indirectGPA, len: 9 * 16, flags: .indirect))
        let r = mark(length: 9 * 0x1000)
        XCTAssertEqual(r.error, .chainTooLong(limit: Self.queueSize))
        XCTAssertEqual(r.pages, 8, "the first queue-size buffers are marked")
    }

    /// `log=buffer`: each writable buffer that holds written bytes whole (readable buffers and
    /// the buffers after `used.len` still not), up to `bufferMarkLimit` per buffer: a length the
    /// guest rewrote to gigabytes is not marked.
    func testBufferGranularityMarksWrittenBuffersWhole() {
        let b = Self.bufferGPA
        let p = Self.page(b)
        set(0, D(addr: b, len: 100, flags: .next, next: 3))                            // readable: not marked
        set(3, D(addr: b + 0x1_0000, len: 0x2000, flags: [.write, .next], next: 5))     // 2 pages, 10 bytes written
        set(5, D(addr: b + 0x2_0000, len: 0x3000, flags: .write))                       // nothing written: not marked
        var r = mark(length: 10, granularity: .buffer)
        XCTAssertNil(r.error)
        XCTAssertEqual(r.pages, 2)
        XCTAssertEqual(marked(p...(p + 0x40)), [p + 0x10, p + 0x11])
        logBits.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
        r = mark(length: 0x2001, granularity: .buffer)
        XCTAssertEqual(marked(p...(p + 0x40)), [p + 0x10, p + 0x11, p + 0x20, p + 0x21, p + 0x22])
        // A used.len of 0: the device wrote nothing, nothing is marked.
        logBits.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
        XCTAssertEqual(mark(length: 0, granularity: .buffer).pages, 0)
        XCTAssertEqual(marked(p...(p + 0x40)), [])
        // A 4 GiB buffer: marked up to the limit past its written bytes.
        set(6, D(addr: b, len: 0xFFFF_FFFF, flags: .write))
        r = mark(head: 6, length: 100, granularity: .buffer)
        XCTAssertEqual(r.pages, (WrittenBytesMarker.bufferMarkLimit + 4095) / 4096)
    }

    /// `log=page-run`: the aligned 64-page runs around the written bytes (a superset of `exact`),
    /// each counted once per batch however many buffers fall in it.
    func testPageRunGranularityMarksAlignedRunsAroundTheWrittenBytes() {
        let b = Self.bufferGPA + 0x4_1000      // page 1 of a run... and into the next run below
        set(0, D(addr: b, len: 0x100, flags: [.write, .next], next: 1))
        set(1, D(addr: b + 0x3_e000, len: 0x3000, flags: .write))    // crosses into the next run
        let r = mark(length: 0x2100, granularity: .pageRun)
        XCTAssertNil(r.error)
        let run = (b >> 12) & ~63
        XCTAssertEqual(r.pages, 128, "two runs")
        XCTAssertEqual(marked((run - 1)...(run + 128)), Array(run..<(run + 128)))
        // Exact marks are a subset of page-run's for the same chain.
        logBits.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
        _ = mark(length: 0x2100)
        XCTAssertTrue(marked((run - 1)...(run + 128)).allSatisfy { $0 >= run && $0 < run + 128 })
        XCTAssertEqual(marked((run - 1)...(run + 128)).count, 3)
        // Many buffers in one run: one run counted, the rest cost nothing.
        var marker = WrittenBytesMarker(batch: DirtyLog.Batch(log: log), granularity: .pageRun)
        for k in 0..<UInt64(16) {
            set(2, D(addr: Self.bufferGPA + k * 0x800, len: 0x800, flags: .write))
            XCTAssertNoThrow(try marker.mark(head: 2, length: 0x800, table: table, queueSize: Self.queueSize, tables: tables))
        }
        marker.batch.flush()
        XCTAssertEqual(marker.pages, 64)
    }
}
