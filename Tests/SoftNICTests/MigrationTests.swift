#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Relay
import SoftNIC
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio
import XCTest

/// Live-migration logging through the relay, driven by the frontend library as QEMU would.
class MigrationTests: SoftNICTestCase {
    /// nil: the SoftNIC serves the port directly; otherwise through the kernel vhost-vdpa driver
    /// over the kernel model, with (true) or without (false) SUSPEND (subclasses below).
    var kernelModel: Bool? { nil }
    /// A real vhost-vdpa character device to run on instead (the vDPA guest's tests).
    var kernelDevice: String? { nil }

    func start(link: String = "source:size=128", loop: RelayLoopMode = .hybrid,
               migration: MigrationOptions = MigrationOptions()) throws -> (SoftNICTestDaemon, TestGuest) {
        let d = try makeDaemon([.init(id: "vm", link: link, mac: TestFrames.dst, kernelModel: kernelModel, kernelDevice: kernelDevice,
                                      migration: migration)], options: PortOptions(relayLoop: loop))
        let g = try d.connectAndStart("vm")
        return (d, g)
    }

    /// Sequence numbers of source frames, checking their layout.
    func sequences(_ frames: [ReceivedFrame], file: StaticString = #filePath, line: UInt = #line) -> [UInt64] {
        frames.map { f in
            XCTAssertEqual(Array(f.frame[12..<14]), [0x88, 0xB5], file: file, line: line)
            return TestFrames.be64(f.frame[14..<22])
        }
    }

    /// Runs 100 RX frames with logging on and compares the pages that changed in guest RAM with
    /// the pages marked in the log. Returns (changed but unmarked, marked but unchanged except
    /// the used ring, device-written pages).
    func loggedRun(_ d: SoftNICTestDaemon, _ g: TestGuest) throws -> (unmarked: Set<UInt64>, extra: Set<UInt64>, written: Int) {
        g.postRX(count: 32)
        _ = g.receive(32)
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        XCTAssertEqual(d.queue("vm", 0).switchovers, 1)
        XCTAssertEqual(d.queue("vm", 1).mode, "direct", "TX stays direct: the device writes only its used ring there")
        log.clearLog()

        let changed = try pagesChangedByRX(g, frames: 100)
        let dirty = Set(log.dirtyPages())
        let p0 = g.placed[0]!
        let usedPages = pages(p0.usedGPA, RingPlacement.usedRingBytes(size: p0.size))
        let availPages = pages(p0.availGPA, RingPlacement.availRingBytes(size: p0.size))
        XCTAssertFalse(dirty.intersection(usedPages).isEmpty, "the used ring must be marked")
        return (changed.subtracting(dirty).subtracting(availPages), dirty.subtracting(changed).subtracting(usedPages),
                changed.subtracting(usedPages).subtracting(availPages).count)
    }

    /// With logging on, every page the device wrote is marked, and nothing else is but the used ring.
    func testRelayMarksExactlyTheWrittenPages() throws {
        let (d, g) = try start()
        let r = try loggedRun(d, g)
        XCTAssertTrue(r.unmarked.isEmpty, "pages the device wrote but the log misses: \(r.unmarked.sorted())")
        XCTAssertTrue(r.extra.isEmpty, "pages marked that nobody wrote: \(r.extra.sorted())")
        XCTAssertGreaterThan(r.written, 10)
        XCTAssertEqual(d.queue("vm", 0).relayed, 100, "the 32 frames before logging went direct; the 100 during it are relayed")
        XCTAssertGreaterThan(d.queue("vm", 0).pagesMarked, 0)
        XCTAssertNotNil(d.daemon.stats().ports[0].relay)

        try g.frontend.disableLogging()
        XCTAssertEqual(d.queue("vm", 0).mode, "direct")
        XCTAssertEqual(d.queue("vm", 0).switchovers, 2)
    }

    /// `log=buffer` and `log=page-run` mark at least every page the device wrote (the check above),
    /// and more than `exact` does: `buffer` the unwritten rest of each buffer, `page-run` whole
    /// 64-page runs.
    func testCoarserLogOptionsCoverEveryWrittenPage() throws {
        var marked: [LogGranularity: UInt64] = [:]
        for granularity in LogGranularity.allCases {
            let (d, g) = try start(link: "source:size=128", migration: MigrationOptions(log: granularity))
            let r = try loggedRun(d, g)
            XCTAssertTrue(r.unmarked.isEmpty, "log=\(granularity.rawValue): pages the device wrote but the log misses: \(r.unmarked.sorted())")
            XCTAssertGreaterThan(r.written, 10)
            XCTAssertEqual(d.queue("vm", 0).relayed, 100)
            marked[granularity] = d.queue("vm", 0).pagesMarked
            if granularity == .pageRun {
                XCTAssertGreaterThan(r.extra.count, r.written, "page-run marks whole 64-page runs around the written pages")
            }
            try g.frontend.disableLogging()
            XCTAssertEqual(d.queue("vm", 0).mode, "direct")
            // A real kernel device (the vDPA guest's subclass) is opened once at a time.
            d.stop()
        }
        XCTAssertGreaterThanOrEqual(marked[.buffer]!, marked[.exact]!)
        XCTAssertGreaterThan(marked[.pageRun]!, 0)
    }

    /// The check above can fail: with the test-only switch that skips buffer marking, it finds the
    /// device's pages unmarked.
    func testMarkingCheckCatchesSkippedMarking() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst, kernelModel: kernelModel, kernelDevice: kernelDevice)],
                               options: PortOptions(testSwitches: TestSwitches(skipBufferMarking: true)))
        let g = try d.connectAndStart("vm")
        let r = try loggedRun(d, g)
        XCTAssertGreaterThan(r.unmarked.count, 10, "skipping buffer marking must leave device-written pages unmarked")
    }

    /// Frames cross direct → relay → direct with none lost, repeated or reordered, in each loop.
    func testSequenceSurvivesSwitchoversInEachRelayLoop() throws {
        for loop in RelayLoopMode.allCases {
            let (d, g) = try start(loop: loop)
            var seqs: [UInt64] = []
            // Each switch happens right after a batch of buffers is posted, while the device is
            // filling them; the batch is collected after the switch.
            func postSwitchCollect(_ toggle: () throws -> Void) rethrows {
                g.postRX(count: 64)
                try toggle()
                seqs += sequences(g.receive(64))
            }
            try postSwitchCollect {}
            for _ in 0..<3 {
                try postSwitchCollect { _ = try g.frontend.enableLogging(requireU64Reply: true) }
                XCTAssertEqual(d.queue("vm", 0).mode, "relay", "\(loop)")
                try postSwitchCollect {}
                try postSwitchCollect { try g.frontend.disableLogging() }
                XCTAssertEqual(d.queue("vm", 0).mode, "direct", "\(loop)")
            }
            try postSwitchCollect {}
            XCTAssertEqual(seqs.count, 64 * 11, "\(loop)")
            for i in 1..<seqs.count where seqs[i] != seqs[i - 1] + 1 {
                XCTFail("\(loop): sequence broken at \(i): \(seqs[i - 1]) then \(seqs[i])")
                break
            }
            XCTAssertEqual(d.queue("vm", 0).switchovers, 6, "\(loop)")
            d.stop()
            daemon = nil
        }
    }

    /// GET_VRING_BASE on a relayed ring: everything completed is relayed, the whole used ring is
    /// marked, and nothing writes the ring afterwards.
    func testStopWhileRelayed() throws {
        let (d, g) = try start()
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        g.postRX(count: 40)
        _ = g.receive(40)
        log.clearLog()
        let base = try g.stopRing(0)
        XCTAssertEqual(base, 40)
        let p0 = g.placed[0]!
        for page in pages(p0.usedGPA, RingPlacement.usedRingBytes(size: p0.size)) {
            XCTAssertTrue(log.isDirty(page: page), "used ring page \(page) not marked at stop")
        }
        let used = g.usedIndex(0)
        g.postRX(count: 8)
        usleep(50_000)
        XCTAssertEqual(g.usedIndex(0), used, "the ring was written after GET_VRING_BASE")
        XCTAssertEqual(d.queue("vm", 0).mode, "stopped")
    }

    /// A TX ring stays direct while logging; its whole used ring is marked when it stops.
    func testDirectTXUsedRingMarkedAtStop() throws {
        let (_, g) = try start(link: "sink")
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        g.sendAndComplete((0..<20).map { TestFrames.make(length: 100, seed: $0) })
        log.clearLog()
        _ = try g.stopRing(1)
        let p1 = g.placed[1]!
        for page in pages(p1.usedGPA, RingPlacement.usedRingBytes(size: p1.size)) {
            XCTAssertTrue(log.isDirty(page: page), "TX used ring page \(page) not marked at stop")
        }
    }

    /// A new SET_LOG_BASE while logging moves all marking to the new log before it is answered.
    func testNewLogBaseTakesOverMarking() throws {
        let (_, g) = try start()
        let first = try g.frontend.enableLogging(requireU64Reply: true)
        g.postRX(count: 16)
        _ = g.receive(16)
        let second = try DirtyLogBuffer(covering: g.frontend.memoryTable)
        try g.frontend.setLogBase(second, requireU64Reply: true)
        first.clearLog()
        g.postRX(count: 16)
        _ = g.receive(16)
        XCTAssertTrue(first.dirtyPages().isEmpty, "the old log was still marked after the new one was answered")
        XCTAssertFalse(second.dirtyPages().isEmpty)
    }

    /// A ring started while logging is on starts in relay mode.
    func testRingStartedDuringLoggingStartsInRelay() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst, kernelModel: kernelModel, kernelDevice: kernelDevice)])
        let g = try d.connect("vm")
        try g.startRing(1)
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        try g.startRing(0)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        log.clearLog()
        g.postRX(count: 10)
        let frames = g.receive(10)
        XCTAssertEqual(frames.count, 10)
        for e in frames.flatMap(\.elements) {
            _ = e
        }
        XCTAssertGreaterThan(log.dirtyPages().count, 1)
        XCTAssertEqual(d.queue("vm", 0).relayed, 10)
    }

    /// SEND_RARP makes the device announce the MAC on its link (loopback: it comes back on RX).
    func testSendRARP() throws {
        let (_, g) = try start(link: "loopback")
        g.postRX(count: 4)
        let mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        let v = mac.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        _ = try g.frontend.request(.sendRARP, payload: .u64(v), needReply: true)
        let f = g.receive(1)[0].frame
        XCTAssertEqual(Array(f[0..<6]), [UInt8](repeating: 0xff, count: 6))
        XCTAssertEqual(Array(f[6..<12]), mac)
        XCTAssertEqual(Array(f[12..<14]), [0x80, 0x35])
    }
}

/// The marking checks' page arithmetic (MigrationTests, DirtyTrackingTests).
extension SoftNICTestCase {
    /// Pages whose bytes differ between two snapshots of one RAM region.
    func changedPages(_ a: [UInt8], _ b: [UInt8], base: UInt64) -> Set<UInt64> {
        var out = Set<UInt64>()
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                var off = 0
                while off < a.count {
                    if memcmp(pa.baseAddress! + off, pb.baseAddress! + off, 4096) != 0 { out.insert((base + UInt64(off)) >> 12) }
                    off += 4096
                }
            }
        }
        return out
    }

    func pages(_ gpa: UInt64, _ length: UInt64) -> Set<UInt64> { Set((gpa >> 12)...((gpa + length - 1) >> 12)) }

    /// Posts `frames` RX buffers on ring 0 without publishing them, snapshots the guest's RAM, lets
    /// the device fill them (publish, kick, receive all), and returns the pages whose bytes changed.
    func pagesChangedByRX(_ g: TestGuest, frames: Int, file: StaticString = #filePath, line: UInt = #line) throws -> Set<UInt64> {
        g.postRX(count: frames, publish: false)
        let ram = g.ram[0]
        let before = try ram.read(at: ram.baseGPA, count: Int(ram.size))
        g.ring(0).publish()
        g.kick(0)
        XCTAssertEqual(g.receive(frames).count, frames, file: file, line: line)
        let after = try ram.read(at: ram.baseGPA, count: Int(ram.size))
        return changedPages(before, after, base: ram.baseGPA)
    }
}
