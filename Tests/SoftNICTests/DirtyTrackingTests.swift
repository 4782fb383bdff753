#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Foundation
import Relay
import SoftNIC
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio
import XCTest

/// `migration=iommu-dirty`: the rings stay direct while logging is on; the SoftNIC's IOMMU
/// records the pages it writes and the port folds them into the frontend's log.
final class DirtyTrackingTests: SoftNICTestCase {
    static let iommuDirty = MigrationOptions(method: .iommuDirty)

    /// A port with migration=iommu-dirty. `period` 0: no background folds, so the log fills only
    /// at the folds that replies need.
    func startDirty(period: Int? = 0, skipFold: Bool = false, regions: [(base: UInt64, size: UInt64)] = [(0, 32 << 20)],
                    journal: (any RelayJournal)? = nil) throws
        -> (SoftNICTestDaemon, TestGuest) {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst, migration: Self.iommuDirty)],
                               options: PortOptions(testSwitches: TestSwitches(journal: journal, skipDirtyFold: skipFold,
                                                                               dirtyFoldPeriodMillis: period)))
        let g = try d.connect("vm", regions: regions)
        try g.startRing(0)
        try g.startRing(1)
        return (d, g)
    }

    func dirtyStats(_ d: SoftNICTestDaemon) -> DirtyTrackingStats? { d.daemon.stats().ports[0].dirtyTracking }

    func usedPages(_ g: TestGuest, _ ring: UInt32) -> Set<UInt64> {
        let p = g.placed[ring]!
        return pages(p.usedGPA, RingPlacement.usedRingBytes(size: p.size))
    }

    /// RX and TX traffic with logging on; the log is read after LOG_ALL goes off. Returns the pages
    /// that changed in guest RAM while the device wrote RX buffers but are not in the log (the
    /// guest's avail ring aside), the pages in the log that nobody wrote (used rings aside), and the
    /// log itself.
    func dirtyRun(_ d: SoftNICTestDaemon, _ g: TestGuest) throws -> (unmarked: Set<UInt64>, extra: Set<UInt64>, written: Int, log: DirtyLogBuffer) {
        g.postRX(count: 32)
        _ = g.receive(32)
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 0).mode, "direct", "iommu-dirty keeps the rings direct")
        XCTAssertEqual(d.queue("vm", 1).mode, "direct")
        XCTAssertEqual(d.queue("vm", 0).switchovers, 0)
        XCTAssertNil(d.daemon.stats().ports[0].relay, "no relay thread in iommu-dirty mode")
        XCTAssertEqual(dirtyStats(d)?.enabled, true)
        log.clearLog()
        // TX first (its guest-side writes must not count as the device's): the device writes the TX used ring.
        g.sendAndComplete((0..<20).map { TestFrames.make(length: 100, seed: $0) })
        let changed = try pagesChangedByRX(g, frames: 100)
        XCTAssertTrue(log.dirtyPages().isEmpty, "no background folds (period 0): nothing in the log before the fold a reply needs")
        try g.frontend.disableLogging()
        XCTAssertEqual(dirtyStats(d)?.enabled, false)
        let dirty = Set(log.dirtyPages())
        let p0 = g.placed[0]!
        let availPages = pages(p0.availGPA, RingPlacement.availRingBytes(size: p0.size))
        let used = usedPages(g, 0).union(usedPages(g, 1))
        return (changed.subtracting(dirty).subtracting(availPages), dirty.subtracting(changed).subtracting(used),
                changed.subtracting(used).subtracting(availPages).count, log)
    }

    /// Every page the device wrote (RX buffers, RX and TX used rings) is in the log once LOG_ALL
    /// is off, and nothing else is; the rings never left the direct path.
    func testDirtyTrackingLogsEveryWrittenPageWithTheRingsDirect() throws {
        let (d, g) = try startDirty()
        let r = try dirtyRun(d, g)
        XCTAssertTrue(r.unmarked.isEmpty, "pages the device wrote but the log misses: \(r.unmarked.sorted())")
        XCTAssertTrue(r.extra.isEmpty, "pages logged that nobody wrote: \(r.extra.sorted())")
        XCTAssertGreaterThan(r.written, 10)
        for page in usedPages(g, 0) { XCTAssertTrue(r.log.isDirty(page: page), "RX used ring page \(page)") }
        for page in usedPages(g, 1) { XCTAssertTrue(r.log.isDirty(page: page), "TX used ring page \(page)") }
        let s = dirtyStats(d)
        XCTAssertGreaterThan(s?.folds ?? 0, 0)
        XCTAssertGreaterThan(s?.pagesFolded ?? 0, UInt64(r.written))
        XCTAssertEqual(d.queue("vm", 0).mode, "direct")
        XCTAssertEqual(d.queue("vm", 0).relayed, 0)
        XCTAssertEqual(d.queue("vm", 0).switchovers, 0)
    }

    /// VDPAD_TEST_JOURNAL on an iommu-dirty port: no relay runs, so the SoftNIC journals its own RX
    /// writes, only while tracking is on: one line per buffer written (header + frame), marked,
    /// its checksum that of the guest's bytes, its publish index one that exposes it.
    func testDeviceJournalsItsRXWritesOnlyWhileTracking() throws {
        let journal = MemoryJournal()
        let (d, g) = try startDirty(journal: journal)
        _ = d
        g.postRX(count: 8)
        XCTAssertEqual(g.receive(8).count, 8)
        XCTAssertTrue(journal.lines.isEmpty, "nothing journaled with tracking off")
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        g.postRX(count: 20)
        XCTAssertEqual(g.receive(20).count, 20)
        try g.frontend.disableLogging()
        withExtendedLifetime(log) {}
        let lines = journal.lines
        XCTAssertEqual(lines.count, 20)
        for l in lines {
            XCTAssertEqual(l.ring, 0)
            XCTAssertTrue(l.marked)
            XCTAssertEqual(l.length, 12 + 128)
            XCTAssertTrue((9...28).contains(Int(l.publishIndex)), "publish index \(l.publishIndex)")
            var sum: UInt64 = 0xcbf2_9ce4_8422_2325
            for b in g.read(l.gpa, Int(l.length)) { sum = (sum ^ UInt64(b)) &* 0x100_0000_01b3 }
            XCTAssertEqual(sum, l.checksum, "checksum of the guest's bytes at 0x\(String(l.gpa, radix: 16))")
        }
        g.postRX(count: 5)
        XCTAssertEqual(g.receive(5).count, 5)
        XCTAssertEqual(journal.lines.count, 20, "nothing journaled once tracking is off again")
    }

    /// The negative control: with VDPAD_TEST_SKIP_DIRTY_FOLD the folds drop the device's bits, and
    /// the check above finds the written pages missing.
    func testMarkingCheckCatchesSkippedFold() throws {
        let (d, g) = try startDirty(skipFold: true)
        let r = try dirtyRun(d, g)
        XCTAssertGreaterThan(r.unmarked.count, 10, "dropping the folds must leave device-written pages out of the log")
        XCTAssertGreaterThan(dirtyStats(d)?.pagesDropped ?? 0, 10)
    }

    /// GET_VRING_BASE answers only after the device's bits are in the log.
    func testGetVringBaseFoldsBeforeAnswering() throws {
        let (_, g) = try startDirty()
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        log.clearLog()
        let changed = try pagesChangedByRX(g, frames: 40)
        XCTAssertTrue(log.dirtyPages().isEmpty)
        XCTAssertEqual(try g.stopRing(0), 40)
        let p0 = g.placed[0]!
        let buffers = changed
            .subtracting(pages(p0.availGPA, RingPlacement.availRingBytes(size: p0.size))).subtracting(usedPages(g, 0))
        XCTAssertGreaterThan(buffers.count, 10)
        let missing = buffers.filter { !log.isDirty(page: $0) }
        XCTAssertTrue(missing.isEmpty, "buffer pages not in the log when GET_VRING_BASE answered: \(missing.sorted())")
        for page in usedPages(g, 0) { XCTAssertTrue(log.isDirty(page: page), "RX used ring page \(page)") }
    }

    /// The background folds carry the device's pages into the log while the rings run, with no
    /// stop and no reply in between.
    func testPeriodicFoldsWhileRunning() throws {
        let (d, g) = try startDirty(period: 10)
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        log.clearLog()
        let folds = dirtyStats(d)?.folds ?? 0
        g.postRX(count: 40)
        XCTAssertEqual(g.receive(40).count, 40)
        let used = usedPages(g, 0)
        XCTAssertTrue(waitUntil(5) { used.allSatisfy { log.isDirty(page: $0) } && log.dirtyPages().count > used.count },
                      "the used ring and buffer pages reach the log without a stop")
        XCTAssertGreaterThan(dirtyStats(d)?.folds ?? 0, folds)
        XCTAssertEqual(dirtyStats(d)?.periodMillis, 10)
        XCTAssertEqual(d.queue("vm", 0).mode, "direct")
    }

    /// A memory-table change while tracking loses no bit: pages the device wrote in a region that
    /// the new table drops are still folded.
    func testMemoryTableChangeLosesNoBit() throws {
        let (_, g) = try startDirty(regions: [(0, 32 << 20), (64 << 20, 8 << 20)])
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        log.clearLog()
        // Buffers in region 1, by hand (the ring's arena is in region 0).
        var bufferPages = Set<UInt64>()
        for _ in 0..<16 {
            let gpa = g.alloc(4096, region: 1, align: 4096)
            bufferPages.insert(gpa >> 12)
            g.add([DriverBuffer(gpa: gpa, length: 4096, isWritable: true)], ring: 0)
        }
        g.ring(0).publish()
        g.kick(0)
        XCTAssertEqual(g.receive(16).count, 16)
        XCTAssertTrue(log.dirtyPages().isEmpty)
        try g.frontend.setMemTable([g.ram[0]])
        _ = try g.stopRing(0)
        let missing = bufferPages.filter { !log.isDirty(page: $0) }
        XCTAssertTrue(missing.isEmpty, "pages of the dropped region lost: \(missing.sorted())")
    }

    /// A new SET_LOG_BASE: what the device wrote before it goes into the old log before the reply
    /// (QEMU syncs the old log after our reply), what it writes after goes into the new one.
    func testNewLogBaseGetsAFoldIntoTheOldLog() throws {
        let (_, g) = try startDirty()
        let first = try g.frontend.enableLogging(requireU64Reply: true)
        first.clearLog()
        g.postRX(count: 16)
        _ = g.receive(16)
        let second = try DirtyLogBuffer(covering: g.frontend.memoryTable)
        try g.frontend.setLogBase(second, requireU64Reply: true)
        XCTAssertFalse(first.dirtyPages().isEmpty, "the old log did not get the device's pages before the reply")
        for page in usedPages(g, 0) { XCTAssertTrue(first.isDirty(page: page)) }
        first.clearLog()
        g.postRX(count: 16)
        _ = g.receive(16)
        _ = try g.stopRing(0)
        XCTAssertTrue(first.dirtyPages().isEmpty, "the old log was folded into after the new one was answered")
        XCTAssertFalse(second.dirtyPages().isEmpty)
    }

    /// LOG_ALL before SET_LOG_BASE: the rings keep running direct; their pages wait in the device
    /// and reach the log once it comes.
    func testLoggingOnBeforeTheLogKeepsTheBitsForIt() throws {
        let (d, g) = try startDirty()
        try g.frontend.setFeatures(g.features | VirtioFeature.vhostLogAll)
        XCTAssertEqual(d.queue("vm", 0).mode, "direct", "never held in iommu-dirty mode")
        g.postRX(count: 16)
        XCTAssertEqual(g.receive(16).count, 16)
        let log = try DirtyLogBuffer(covering: g.frontend.memoryTable)
        try g.frontend.setLogBase(log, requireU64Reply: true)
        _ = try g.stopRing(0)
        XCTAssertGreaterThan(log.dirtyPages().count, usedPages(g, 0).count, "the buffer pages written before the log came")
    }

    /// A device without dirty tracking (the kernel vhost-vdpa driver) makes the port fail when it
    /// is made, with the port and the option named.
    func testDeviceWithoutDirtyTrackingIsRefusedAtPortCreation() throws {
        XCTAssertThrowsError(try makeDaemon([.init(id: "kd", link: "loopback", kernelModel: true, migration: Self.iommuDirty)])) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("'kd'") && text.contains("migration=iommu-dirty"), text)
        }
    }
}

/// A test journal in memory.
final class MemoryJournal: RelayJournal, @unchecked Sendable {
    struct Line { let ring: Int; let gpa: UInt64; let length: UInt32; let checksum: UInt64; let marked: Bool; let publishIndex: UInt16 }
    private let lock = NSLock()
    private var recorded: [Line] = []
    var lines: [Line] { lock.withLock { recorded } }
    func record(ring: Int, gpa: UInt64, length: UInt32, checksum: UInt64, marked: Bool, publishIndex: UInt16) {
        lock.withLock { recorded.append(Line(ring: ring, gpa: gpa, length: length, checksum: checksum, marked: marked, publishIndex: publishIndex)) }
    }
}
