#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import Relay
import SoftNIC
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio
import XCTest

/// Hostile frontends and guests against the running data path (issue 7, classes 2 to 6): each
/// attack is made as a frontend or guest would make it, over the real socket or in guest memory.
final class HardeningTests: SoftNICTestCase {
    override var stopTimeout: Double { 5 }

    /// A loopback port works: frames sent on TX come back on RX.
    func assertLoopbackWorks(_ d: SoftNICTestDaemon, _ id: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let g = try d.connectAndStart(id)
        g.postRX(count: 4)
        g.sendAndComplete((0..<4).map { TestFrames.make(length: 80, seed: $0) }, file: file, line: line)
        XCTAssertEqual(g.receive(4, file: file, line: line).count, 4, "port \(id) must still carry traffic", file: file, line: line)
        g.frontend.disconnect()
        XCTAssertTrue(waitUntil { d.portStatus(id).connection == "listening" }, file: file, line: line)
    }

    /// How many mappings of the memfd named `name` this process holds (-1, and the test fails,
    /// when /proc/self/maps cannot be read).
    func mappings(_ name: String) -> Int {
        do { return try ProcessMaps.sizes(ofMemfdNamed: name).count } catch {
            XCTFail("\(error)")
            return -1
        }
    }

    // MARK: class 2: a file that shrinks under the daemon's mapping

    /// The frontend truncates its guest RAM file while the device is serving it. The daemon's next
    /// access would raise SIGBUS and kill every port; the guard absorbs it, the session is closed
    /// with an error saying why, the other port keeps working, and so does the next frontend.
    func testShrunkGuestMemoryClosesOnlyThatSession() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst), .init(id: "other", link: "loopback")])
        let other = try d.connectAndStart("other")
        let g = try d.connectAndStart("vm")
        g.postRX(count: 16)
        XCTAssertEqual(g.receive(16).count, 16)
        let faultsBefore = guardedMappingFaults
        // From here on the test must not touch the guest RAM itself: its own mapping would fault too.
        XCTAssertEqual(ftruncate(g.ram[0].fd, 0), 0)
        g.kick(0)  // the device reads the avail ring: a page that is gone
        XCTAssertTrue(waitUntil { d.portStatus("vm").connection == "listening" }, "the port must close the session whose file shrank")
        let err = d.portStatus("vm").lastError ?? ""
        XCTAssertTrue(err.contains("shrank") && err.contains("SIGBUS"), err)
        XCTAssertGreaterThan(guardedMappingFaults, faultsBefore)

        other.postRX(count: 4)
        other.sendAndComplete((0..<4).map { TestFrames.make(length: 80, seed: $0) })
        XCTAssertEqual(other.receive(4).count, 4, "the other port's guest must be undisturbed")
        let next = try d.connect("vm")
        try next.startRing(0)
        next.postRX(count: 8)
        XCTAssertEqual(next.receive(8).count, 8, "the next frontend on the same port must work")
    }

    /// The same for the dirty log: the relay's marks land in a file that shrank.
    func testShrunkLogClosesOnlyThatSession() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst), .init(id: "other", link: "loopback")])
        let g = try d.connectAndStart("vm")
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        XCTAssertEqual(ftruncate(log.fd, 0), 0)
        g.postRX(count: 8)
        XCTAssertTrue(waitUntil { d.portStatus("vm").connection == "listening" }, "the port must close the session whose log shrank")
        XCTAssertTrue((d.portStatus("vm").lastError ?? "").contains("shrank"), d.portStatus("vm").lastError ?? "")
        try assertLoopbackWorks(d, "other")
        let next = try d.connect("vm")
        try next.startRing(0)
        next.postRX(count: 8)
        XCTAssertEqual(next.receive(8).count, 8, "the next frontend on the same port must work")
    }

    // MARK: class 3: frontend eventfds never block a daemon thread

    /// One blocking eventfd given as the kick of two rings. A kick makes both rings' doorbells
    /// readable; the first read drains the counter, and a blocking second read would wedge the
    /// DMA engine forever. The session makes it non-blocking: both rings keep being served, also
    /// after one of them stops.
    func testOneBlockingKickEventFDForTwoRings() throws {
        let d = try makeDaemon([.init(id: "vm", link: "sink", queuePairs: 2), .init(id: "other", link: "loopback")])
        let g = try d.connect("vm")
        try g.startRing(1)
        try g.startRing(3)
        let shared = try EventFD.make(nonBlocking: false)
        for ring: UInt32 in [1, 3] {
            _ = try g.stopRing(ring)
            _ = try g.frontend.request(.setVringKick, payload: .vringFile(index: ring, hasFD: true), fds: [shared.raw], needReply: true)
        }
        func sendOn(_ ring: UInt32, _ n: Int) {
            let used = g.usedIndex(ring)
            _ = g.send((0..<n).map { TestFrames.make(length: 80, seed: $0) }, ring: ring, kick: false)
            EventFD.signal(shared.raw)
            XCTAssertTrue(waitUntil { g.usedIndex(ring) == used &+ UInt16(n) }, "ring \(ring) must be served on the shared doorbell")
        }
        // Let the engine go to sleep on its doorbells between rounds, so that a kick wakes it.
        for _ in 0..<3 {
            usleep(5_000)
            sendOn(1, 4)
            usleep(5_000)
            sendOn(3, 4)
        }
        _ = try g.stopRing(1)
        usleep(5_000)
        sendOn(3, 4)
        try assertLoopbackWorks(d, "other")
    }

    /// A call eventfd that the frontend gave blocking and at its maximum count: a blocking write
    /// would wedge the DMA engine forever (and SIGTERM with it). It is made non-blocking on
    /// arrival: the device goes on and the daemon stops in time.
    func testSaturatedBlockingCallEventFDDoesNotWedgeTheEngine() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst), .init(id: "other", link: "loopback")])
        let g = try d.connectAndStart("vm")
        let call = try EventFD.make(nonBlocking: false)
        var max: UInt64 = 0xFFFF_FFFF_FFFF_FFFE
        XCTAssertEqual(write(call.raw, &max, 8), 8)
        _ = try g.frontend.request(.setVringCall, payload: .vringFile(index: 0, hasFD: true), fds: [call.raw], needReply: true)
        g.postRX(count: 64)
        XCTAssertEqual(g.receive(64).count, 64, "the engine must keep serving with a saturated interrupt eventfd")
        g.postRX(count: 64)
        XCTAssertEqual(g.receive(64).count, 64)
        try assertLoopbackWorks(d, "other")
    }

    /// The open file of an eventfd is shared: a frontend can make its call eventfds blocking again
    /// after handing them over, and saturate them. On a loopback port one TX frame then blocks the
    /// DMA engine in the TX ring's interrupt write, and the RX ring's would block it next. The next
    /// control operation finds the engine not answering within 1 s and interrupts it; the engine
    /// then stops using every eventfd that is blocking now (those rings fault, naming why), so it
    /// cannot block again. The port recovers, its next frontend works, the other port is
    /// undisturbed, and shutdown completes in time with two such ports.
    func testFrontendThatReblocksItsCallEventFDsCannotWedgeThePort() throws {
        let d = try makeDaemon([.init(id: "vm", link: "loopback"),
                                .init(id: "vm2", link: "source:size=128", mac: TestFrames.dst),
                                .init(id: "other", link: "loopback")])
        func reblock(_ g: TestGuest, _ ring: UInt32) throws {
            let call = try XCTUnwrap(g.frontend.callFD(ring: ring))
            EventFD.drain(call)
            XCTAssertEqual(fcntl(call, F_SETFL, fcntl(call, F_GETFL) & ~O_NONBLOCK), 0)
            var max: UInt64 = 0xFFFF_FFFF_FFFF_FFFE
            XCTAssertEqual(write(call, &max, 8), 8)
        }
        func wedge(_ id: String) throws -> TestGuest {
            let g = try d.connectAndStart(id)
            try reblock(g, 0)
            try reblock(g, 1)
            g.postRX(count: 16)
            if id == "vm" { _ = g.send([TestFrames.make(length: 80, seed: 1)]) }
            return g
        }
        let g = try wedge("vm")
        try assertLoopbackWorks(d, "other")
        // The engine is blocked in an interrupt write: the first control operation has to
        // interrupt it, so it takes the mailbox's 1 s timeout.
        let t0 = Date()
        _ = try g.frontend.getVringBase(index: 0)
        let took = Date().timeIntervalSince(t0)
        XCTAssertGreaterThan(took, 0.9, "GET_VRING_BASE answered in \(took) s: the engine was not blocked, so this test shows nothing")
        XCTAssertLessThan(took, 2.5)
        XCTAssertTrue(d.counters("vm", 1).error?.contains("blocking again") ?? false, d.counters("vm", 1).error ?? "no fault on the TX ring")
        let t1 = Date()
        _ = try g.frontend.getVringBase(index: 1)
        XCTAssertLessThan(Date().timeIntervalSince(t1), 0.5, "the engine must not block again once it stopped using the blocking eventfds")
        g.frontend.disconnect()
        XCTAssertTrue(waitUntil { d.portStatus("vm").connection == "listening" })
        try assertLoopbackWorks(d, "vm")

        let a = try wedge("vm"), b = try wedge("vm2")
        let start = Date()
        d.stop(timeout: 5)
        XCTAssertLessThan(Date().timeIntervalSince(start), 5, "SIGTERM must complete within 5 s")
        daemon = nil
        _ = (a, b)
    }

    // MARK: class 4: the daemon's IOVA range stays the daemon's

    /// While the ring is relayed, a guest posts an RX buffer whose address is the mediated used
    /// ring's IOVA. The device must not write there (it would corrupt the relay's ring): guest
    /// buffers translate through guest memory only, so the chain is a device fault.
    func testGuestBufferCannotPointIntoAMediatedRing() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst)])
        let g = try d.connectAndStart("vm")
        _ = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        g.postRX(count: 4)
        XCTAssertEqual(g.receive(4).count, 4)
        g.add([DriverBuffer(gpa: MediatedUsedRing.iova(forRing: 0), length: 2048, isWritable: true)], ring: 0)
        g.ring(0).publish()
        g.kick(0)
        XCTAssertTrue(waitUntil { d.counters("vm", 0).error != nil }, "a buffer in the daemon's IOVA range must fault the queue")
        XCTAssertTrue(d.counters("vm", 0).error?.contains("outside guest memory") ?? false, d.counters("vm", 0).error ?? "")
        XCTAssertEqual(d.queue("vm", 0).relayed, 4, "nothing but the 4 good frames reached the guest")
    }

    // MARK: class 5: bring-up while logging is on

    /// Snapshot, run `receive` frames, and return device-written pages the log did not mark.
    func unmarkedPages(_ g: TestGuest, _ log: DirtyLogBuffer, before: [UInt8], count: Int) -> Set<UInt64> {
        XCTAssertEqual(g.receive(count).count, count)
        let ram = g.ram[0]
        let after = try! ram.read(at: ram.baseGPA, count: Int(ram.size))
        var changed = Set<UInt64>()
        before.withUnsafeBytes { pa in
            after.withUnsafeBytes { pb in
                var off = 0
                while off < before.count {
                    if memcmp(pa.baseAddress! + off, pb.baseAddress! + off, 4096) != 0 { changed.insert((ram.baseGPA + UInt64(off)) >> 12) }
                    off += 4096
                }
            }
        }
        let p0 = g.placed[0]!
        let avail = Set((p0.availGPA >> 12)...((p0.availGPA + RingPlacement.availRingBytes(size: p0.size) - 1) >> 12))
        return changed.subtracting(log.dirtyPages()).subtracting(avail)
    }

    /// QEMU's vhost_dev_start while logging is on: SET_FEATURES with LOG_ALL, SET_MEM_TABLE, the
    /// rings (not yet enabled: RX must show `held`), 64 RX buffers published and kicked, then a
    /// new SET_LOG_BASE, then SET_VRING_ENABLE. `beforeKick` runs right before the buffers are
    /// published. Returns the device-written pages the new log misses.
    func startAsQEMUWithLoggingOn(_ d: SoftNICTestDaemon, _ g: TestGuest, held: String,
                                  beforeKick: () -> Void = {}) throws -> Set<UInt64> {
        try g.frontend.setFeatures(g.features | VirtioFeature.vhostLogAll)
        try g.frontend.setMemTable(g.ram)
        try g.startRing(0, enable: false)
        try g.startRing(1, enable: false)
        XCTAssertEqual(d.queue("vm", 0).mode, "held", held)
        g.postRX(count: 64, publish: false)
        let before = try g.ram[0].read(at: g.ram[0].baseGPA, count: Int(g.ram[0].size))
        beforeKick()
        g.ring(0).publish()
        g.kick(0)
        let log = try DirtyLogBuffer(covering: g.frontend.memoryTable)
        try g.frontend.setLogBase(log, requireU64Reply: true)
        try g.frontend.setVringEnable(index: 0, true)
        try g.frontend.setVringEnable(index: 1, true)
        return unmarkedPages(g, log, before: before, count: 64)
    }

    /// QEMU's vhost_dev_start while a migration runs (guest reset, more queue pairs, backend
    /// reconnect): SET_FEATURES with LOG_ALL, SET_MEM_TABLE, the rings with the log flag, then
    /// SET_LOG_BASE, then SET_VRING_ENABLE. Every page the device writes is logged.
    func testQEMUStartOrderWithLoggingOnLogsEveryWrite() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst)])
        let g = try d.connect("vm")
        let unmarked = try startAsQEMUWithLoggingOn(d, g, held: "an RX ring started with LOG_ALL and no log must be held")
        XCTAssertTrue(unmarked.isEmpty, "pages the device wrote that the log misses: \(unmarked.sorted())")
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        XCTAssertEqual(d.queue("vm", 0).relayed, 64)
    }

    /// The same with the rings enabled before the log arrives, and with LOG_ALL switched on over
    /// running rings before SET_LOG_BASE: no completion is published until it can be logged.
    func testLoggingOnBeforeTheLogHoldsRunningRings() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst)])
        let g = try d.connectAndStart("vm")
        g.postRX(count: 16)
        XCTAssertEqual(g.receive(16).count, 16)
        try g.frontend.setFeatures(g.features | VirtioFeature.vhostLogAll)
        XCTAssertEqual(d.queue("vm", 0).mode, "held", "LOG_ALL without a log must hold the RX ring")
        XCTAssertEqual(d.queue("vm", 1).mode, "direct", "TX stays direct")
        let usedBefore = g.usedIndex(0)
        g.postRX(count: 64, publish: false)
        let before = try g.ram[0].read(at: g.ram[0].baseGPA, count: Int(g.ram[0].size))
        let doorbells = d.counters("vm", 0).doorbells, packets = d.counters("vm", 0).packets
        g.ring(0).publish()
        g.kick(0)
        // The engine has seen the kick (it counts the doorbell, then serves its running rings in
        // the same pass): a held ring must deliver nothing until the log exists.
        XCTAssertTrue(waitUntil { d.counters("vm", 0).doorbells > doorbells }, "the engine never saw the kick")
        XCTAssertFalse(waitUntil(0.2) { d.counters("vm", 0).packets != packets }, "a held ring delivered frames before the log existed")
        XCTAssertEqual(g.usedIndex(0), usedBefore, "a held ring completed buffers before the log existed")
        let log = try DirtyLogBuffer(covering: g.frontend.memoryTable)
        try g.frontend.setLogBase(log, requireU64Reply: true)
        let unmarked = unmarkedPages(g, log, before: before, count: 64)
        XCTAssertTrue(unmarked.isEmpty, "pages the device wrote that the log misses: \(unmarked.sorted())")
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
    }

    /// A guest whose rings ran with logging on (16 frames received), then were all stopped, as
    /// QEMU's vhost_dev_stop does during a migration. Returns the log that was in force.
    func stoppedWhileLogging() throws -> (SoftNICTestDaemon, TestGuest, DirtyLogBuffer) {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst)])
        let g = try d.connectAndStart("vm")
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        g.postRX(count: 16)
        XCTAssertEqual(g.receive(16).count, 16)
        _ = try g.stopRing(0)
        _ = try g.stopRing(1)
        return (d, g, log)
    }

    /// QEMU restarts the device during a migration (guest reset, link toggled, driver rebound):
    /// it stops every ring, frees its log, then starts the rings again with LOG_ALL and only then
    /// sends a new log. Until the new log arrives the old one must not be marked (QEMU no longer
    /// reads it): the restarted ring is held, and every page it writes lands in the new log.
    func testDeviceRestartDuringMigrationWaitsForTheNewLog() throws {
        let (d, g, old) = try stoppedWhileLogging()
        let unmarked = try startAsQEMUWithLoggingOn(d, g, held: "a ring restarted before the new log must wait for it") {
            old.clearLog()
        }
        XCTAssertTrue(unmarked.isEmpty, "pages the device wrote that the new log misses: \(unmarked.sorted())")
        XCTAssertTrue(old.dirtyPages().isEmpty, "the freed log was marked after the restart: \(old.dirtyPages().count) pages")
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
    }

    /// A frontend that keeps its log across a device restart (enables the rings without a new
    /// SET_LOG_BASE) is served: the held ring is relayed into that log when it is enabled.
    func testRestartWithoutANewLogUsesTheKeptLog() throws {
        let (d, g, log) = try stoppedWhileLogging()
        try g.startRing(0, enable: false)
        try g.startRing(1, enable: false)
        XCTAssertEqual(d.queue("vm", 0).mode, "held")
        g.postRX(count: 32, publish: false)
        let before = try g.ram[0].read(at: g.ram[0].baseGPA, count: Int(g.ram[0].size))
        g.ring(0).publish()
        log.clearLog()
        try g.frontend.setVringEnable(index: 0, true)
        try g.frontend.setVringEnable(index: 1, true)
        g.kick(0)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        let unmarked = unmarkedPages(g, log, before: before, count: 32)
        XCTAssertTrue(unmarked.isEmpty, "pages the device wrote that the kept log misses: \(unmarked.sorted())")
    }

    // MARK: class 6: nothing kept after the frontend goes

    /// After the migration ends no mapping of the log remains; after the disconnect none of the
    /// guest memory (the test's own mapping of each is the one left).
    func testNoMappingOfTheFrontendsFilesRemains() throws {
        let d = try makeDaemon([.init(id: "vm", link: "source:size=128", mac: TestFrames.dst)])
        let g = try d.connect("vm")
        let ramName = g.ram[0].name
        try g.startRing(0)
        try g.startRing(1)
        XCTAssertEqual(mappings(ramName), 2, "the test's mapping and the daemon's")
        let logName = "test-log-\(UInt32.random(in: 0...UInt32.max))"
        let log = try DirtyLogBuffer(ramEndGPA: g.ram.endGPA, name: logName)
        _ = try g.frontend.enableLogging(log: log, requireU64Reply: true)
        g.postRX(count: 16)
        XCTAssertEqual(g.receive(16).count, 16)
        XCTAssertEqual(mappings(logName), 2)
        try g.frontend.disableLogging()
        XCTAssertEqual(d.queue("vm", 0).mode, "direct")
        XCTAssertTrue(waitUntil { self.mappings(logName) == 1 }, "the daemon still maps the log after the migration ended: \(mappings(logName))")
        g.frontend.disconnect()
        XCTAssertTrue(waitUntil { d.portStatus("vm").connection == "listening" })
        XCTAssertTrue(waitUntil { self.mappings(ramName) == 1 }, "the daemon still maps guest memory after the disconnect: \(mappings(ramName))")
    }
}
