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

/// The avail relay (`relay=avail+used`): while logging is on, every ring is fully mediated; the
/// relay checks each chain the guest posts with the device walker's rules, shows the device only
/// the accepted ones, completes the rejected ones with length 0, and answers GET_VRING_BASE with
/// a guest-side base that neither loses nor repeats a chain.
final class AvailRelayTests: SoftNICTestCase {
    static let availUsed = MigrationOptions(relay: .availUsed)

    func start(link: String = "source:size=128", loop: RelayLoopMode = .hybrid,
               testSwitches: TestSwitches = TestSwitches(), log: LogGranularity = .exact) throws -> (SoftNICTestDaemon, TestGuest) {
        let d = try makeDaemon([.init(id: "vm", link: link, mac: TestFrames.dst, migration: MigrationOptions(relay: .availUsed, log: log))],
                               options: PortOptions(relayLoop: loop, testSwitches: testSwitches))
        return (d, try d.connectAndStart("vm"))
    }

    func sequences(_ frames: [ReceivedFrame], file: StaticString = #filePath, line: UInt = #line) -> [UInt64] {
        frames.map { f in
            XCTAssertEqual(Array(f.frame[12..<14]), [0x88, 0xB5], file: file, line: line)
            return TestFrames.be64(f.frame[14..<22])
        }
    }

    func assertConsecutive(_ seqs: [UInt64], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        for i in seqs.indices.dropFirst() where seqs[i] != seqs[i - 1] + 1 {
            XCTFail("\(what): sequence broken at \(i): \(seqs[i - 1]) then \(seqs[i])", file: file, line: line)
            return
        }
    }


    /// 100 RX frames, then 20 TX frames, through the avail relay; returns (pages the device wrote
    /// for RX but the log misses, pages marked that nobody wrote but the RX used ring, pages
    /// marked for TX outside the TX used ring). The TX window is checked on its own: the guest
    /// writes its TX frames itself (QEMU logs those), the device writes only the TX used ring.
    func loggedRun(_ d: SoftNICTestDaemon, _ g: TestGuest) throws -> (unmarked: Set<UInt64>, extra: Set<UInt64>, txExtra: Set<UInt64>) {
        g.postRX(count: 32)
        _ = g.receive(32)
        let log = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 0).mode, "relay")
        XCTAssertEqual(d.queue("vm", 1).mode, "relay", "avail+used mediates TX rings too")
        log.clearLog()
        let changed = try pagesChangedByRX(g, frames: 100)
        let dirty = Set(log.dirtyPages())
        let p0 = g.placed[0]!
        let usedPages = pages(p0.usedGPA, RingPlacement.usedRingBytes(size: p0.size))
        let availPages = pages(p0.availGPA, RingPlacement.availRingBytes(size: p0.size))
        XCTAssertFalse(dirty.intersection(usedPages).isEmpty, "the RX used ring must be marked")

        log.clearLog()
        g.sendAndComplete((0..<20).map { TestFrames.make(length: 100, seed: $0) })
        let p1 = g.placed[1]!
        let txUsed = pages(p1.usedGPA, RingPlacement.usedRingBytes(size: p1.size))
        let txDirty = Set(log.dirtyPages())
        XCTAssertFalse(txDirty.intersection(txUsed).isEmpty, "the TX used ring must be marked")
        return (changed.subtracting(dirty).subtracting(availPages), dirty.subtracting(changed).subtracting(usedPages),
                txDirty.subtracting(txUsed))
    }

    func testAvailRelayMarksExactlyTheWrittenPages() throws {
        let (d, g) = try start()
        let r = try loggedRun(d, g)
        XCTAssertTrue(r.unmarked.isEmpty, "pages the device wrote but the log misses: \(r.unmarked.sorted())")
        XCTAssertTrue(r.extra.isEmpty, "pages marked that nobody wrote: \(r.extra.sorted())")
        XCTAssertTrue(r.txExtra.isEmpty, "TX: pages marked outside the TX used ring: \(r.txExtra.sorted())")
        XCTAssertEqual(d.queue("vm", 0).relayed, 100)
        XCTAssertEqual(d.queue("vm", 1).relayed, 20)
        XCTAssertEqual(d.queue("vm", 1).packets, 20)
        XCTAssertEqual(d.queue("vm", 0).rejectedChains, 0)
        XCTAssertEqual(d.queue("vm", 0).relayErrors, 0)
        try g.frontend.disableLogging()
        XCTAssertEqual(d.queue("vm", 0).mode, "direct")
        XCTAssertEqual(d.queue("vm", 1).mode, "direct")
        // Direct again: traffic goes on.
        g.postRX(count: 8)
        XCTAssertEqual(g.receive(8).count, 8)
    }

    /// `log=` applies to the avail relay's completions too: `page-run` covers every written page
    /// with whole 64-page runs.
    func testAvailRelayWithPageRunLogCoversEveryWrittenPage() throws {
        let (d, g) = try start(log: .pageRun)
        let r = try loggedRun(d, g)
        XCTAssertTrue(r.unmarked.isEmpty, "pages the device wrote but the log misses: \(r.unmarked.sorted())")
        XCTAssertGreaterThan(r.extra.count, 10, "page-run marks whole runs around the written pages")
    }

    /// The check above can fail: with buffer marking skipped it finds the device's pages unmarked.
    func testAvailRelayMarkingCheckCatchesSkippedMarking() throws {
        let (d, g) = try start(testSwitches: TestSwitches(skipBufferMarking: true))
        let r = try loggedRun(d, g)
        XCTAssertGreaterThan(r.unmarked.count, 10, "skipping buffer marking must leave device-written pages unmarked")
    }

    /// Frames cross direct → avail relay → direct with none lost, repeated or reordered, in each
    /// loop mode; TX keeps working across the switches.
    func testSequenceSurvivesAvailRelaySwitchoversInEachLoop() throws {
        for loop in RelayLoopMode.allCases {
            let (d, g) = try start(loop: loop)
            var seqs: [UInt64] = []
            var sent = 0
            func postSwitchCollect(_ toggle: () throws -> Void) rethrows {
                g.postRX(count: 64)
                try toggle()
                seqs += sequences(g.receive(64))
                g.sendAndComplete([TestFrames.make(length: 80, seed: sent)])
                sent += 1
            }
            try postSwitchCollect {}
            for _ in 0..<3 {
                try postSwitchCollect { _ = try g.frontend.enableLogging(requireU64Reply: true) }
                XCTAssertEqual(d.queue("vm", 0).mode, "relay", "\(loop)")
                XCTAssertEqual(d.queue("vm", 1).mode, "relay", "\(loop)")
                try postSwitchCollect {}
                try postSwitchCollect { try g.frontend.disableLogging() }
                XCTAssertEqual(d.queue("vm", 0).mode, "direct", "\(loop)")
            }
            try postSwitchCollect {}
            XCTAssertEqual(seqs.count, 64 * 11, "\(loop)")
            assertConsecutive(seqs, "\(loop)")
            XCTAssertEqual(d.queue("vm", 0).switchovers, 6, "\(loop)")
            XCTAssertTrue(waitUntil { d.queue("vm", 1).packets == UInt64(sent) }, "\(loop): TX packets \(d.queue("vm", 1).packets) of \(sent)")
            XCTAssertEqual(d.queue("vm", 0).faults + d.queue("vm", 1).faults, 0, "\(loop)")
            d.stop()
            daemon = nil
        }
    }

    // MARK: bad chains

    /// A bad chain of each class the device's walker refuses, made on ring `ring` (RX chains
    /// writable, TX readable); returns (name, head to offer).
    func badChains(_ g: TestGuest, ring: UInt32) -> [(String, UInt16)] {
        let r = g.ring(ring)
        let w: VirtqDescriptor.Flags = ring == 0 ? .write : []
        let buf = g.arenaBuffer(ring: ring, 256)
        var out: [(String, UInt16)] = []
        // loop
        r.writeDescriptor(VirtqDescriptor(addr: buf, len: 64, flags: w.union(.next), next: 201), at: 200)
        r.writeDescriptor(VirtqDescriptor(addr: buf, len: 64, flags: w.union(.next), next: 200), at: 201)
        out.append(("loop", 200))
        out.append(("head out of range", 256 + 44))
        r.writeDescriptor(VirtqDescriptor(addr: buf, len: 64, flags: w.union(.next), next: 999), at: 202)
        out.append(("next out of range", 202))
        let inner = g.arenaBuffer(ring: ring, 16)
        let outer = g.arenaBuffer(ring: ring, 32)
        VirtqDescriptor(addr: buf, len: 74, flags: w).store(to: g.host(inner, 16))
        VirtqDescriptor(addr: inner, len: 16, flags: .indirect).store(to: g.host(outer, 16))
        VirtqDescriptor(addr: buf, len: 74, flags: w).store(to: g.host(outer + 16, 16))
        r.writeDescriptor(VirtqDescriptor(addr: outer, len: 32, flags: .indirect), at: 203)
        out.append(("nested indirect", 203))
        r.writeDescriptor(VirtqDescriptor(addr: 0x4000_0000, len: 74, flags: w), at: 204)
        out.append(("buffer outside memory", 204))
        r.writeDescriptor(VirtqDescriptor(addr: (32 << 20) - 16, len: 74, flags: w), at: 205)
        out.append(("buffer straddling the end of RAM", 205))
        return out
    }

    /// Each bad-chain class posted on RX and on TX while relayed: completed with length 0,
    /// counted, never seen by the device (no fault, no packet), and later good chains carry on.
    func testBadChainsAreRejectedAndTheRingCarriesOn() throws {
        let (d, g) = try start(link: "source:size=64")
        _ = try g.frontend.enableLogging(requireU64Reply: true)
        var seqs: [UInt64] = []
        g.postRX(count: 4)
        seqs += sequences(g.receive(4))
        var txPackets: UInt64 = 0
        for (k, (name, head)) in badChains(g, ring: 0).enumerated() {
            let used = g.usedIndex(0)
            g.offerHead(head, ring: 0)
            XCTAssertTrue(waitUntil { g.usedIndex(0) == used &+ 1 }, "RX \(name): the rejected chain was not completed")
            let e = g.ring(0).takeRawUsed()
            XCTAssertEqual(e?.id, UInt32(head), "RX \(name)")
            XCTAssertEqual(e?.length, 0, "RX \(name): a rejected chain is completed with length 0")
            XCTAssertEqual(d.queue("vm", 0).rejectedChains, UInt64(k + 1), "RX \(name)")
            g.postRX(count: 4)
            seqs += sequences(g.receive(4))
        }
        for (k, (name, head)) in badChains(g, ring: 1).enumerated() {
            let used = g.usedIndex(1)
            g.offerHead(head, ring: 1)
            XCTAssertTrue(waitUntil { g.usedIndex(1) == used &+ 1 }, "TX \(name): the rejected chain was not completed")
            let e = g.ring(1).takeRawUsed()
            XCTAssertEqual(e?.id, UInt32(head), "TX \(name)")
            XCTAssertEqual(e?.length, 0, "TX \(name)")
            XCTAssertEqual(d.queue("vm", 1).rejectedChains, UInt64(k + 1), "TX \(name)")
            g.sendAndComplete([TestFrames.make(length: 70, seed: k)])
            txPackets += 1
            XCTAssertTrue(waitUntil { d.queue("vm", 1).packets == txPackets }, "TX \(name): good frames after it")
        }
        assertConsecutive(seqs, "RX")
        XCTAssertEqual(seqs.count, 4 * 7)
        for q in 0..<2 {
            XCTAssertEqual(d.queue("vm", q).faults, 0, "queue \(q): the device saw a bad chain: \(d.queue("vm", q).error ?? "")")
            XCTAssertEqual(d.queue("vm", q).mode, "relay")
        }
        // Stats JSON carries the counter.
        let json = String(decoding: try JSONEncoder().encode(d.daemon.stats()), as: UTF8.self)
        XCTAssertTrue(json.contains("\"rejectedChains\":6"), json)
    }

    /// After a rejected chain the mediated ring's slots lag the guest's positions by one: the
    /// switch back to direct must give the device the guest-side position (the relay's base and
    /// used index), or the device reads the rejected chain again, or skips a good one.
    func testSwitchBackAfterRejectedChainsContinuesAtTheGuestPosition() throws {
        for loop in RelayLoopMode.allCases {
            let (d, g) = try start(link: "source:size=64", loop: loop)
            var seqs: [UInt64] = []
            g.postRX(count: 4)
            seqs += sequences(g.receive(4))
            _ = try g.frontend.enableLogging(requireU64Reply: true)
            for (_, head) in badChains(g, ring: 0).prefix(2) {
                let used = g.usedIndex(0)
                g.offerHead(head, ring: 0)
                XCTAssertTrue(waitUntil { g.usedIndex(0) == used &+ 1 }, "\(loop)")
                _ = g.ring(0).takeRawUsed()
            }
            g.postRX(count: 4)
            seqs += sequences(g.receive(4))
            g.postRX(count: 8)
            try g.frontend.disableLogging()
            XCTAssertEqual(d.queue("vm", 0).mode, "direct")
            seqs += sequences(g.receive(8))
            g.postRX(count: 4)
            seqs += sequences(g.receive(4))
            XCTAssertEqual(seqs.count, 20, "\(loop)")
            assertConsecutive(seqs, "\(loop)")
            XCTAssertEqual(d.queue("vm", 0).faults, 0, "\(loop): \(d.queue("vm", 0).error ?? "")")
            XCTAssertEqual(g.usedIndex(0), g.ring(0).availIndex, "\(loop): every posted chain completed once")
            d.stop()
            daemon = nil
        }
    }

    // MARK: GET_VRING_BASE

    /// Loopback: RX chains are consumed only as TX frames arrive, so accepted chains can wait in
    /// the mediated ring. Posts good A1, A2, bad B, good A3 on RX; sends `frames` TX frames (each
    /// fills one RX chain), then GET_VRING_BASE. Returns (base, RX used entries seen, start).
    func stopWithPending(frames: Int) throws -> (base: UInt32, used: [UsedElement], start: UInt16, heads: [UInt16]) {
        let (d, g) = try start(link: "loopback")
        _ = try g.frontend.enableLogging(requireU64Reply: true)
        let start = g.ring(0).availIndex
        var heads = g.postRX(count: 2)
        let bad: UInt16 = 256 + 7
        g.offerHead(bad, ring: 0)
        heads.append(bad)
        heads += g.postRX(count: 1)
        XCTAssertTrue(waitUntil { d.queue("vm", 0).rejectedChains == 1 })
        usleep(20_000)
        XCTAssertEqual(g.usedIndex(0), start, "the rejected chain must wait for the accepted chains before it")
        if frames > 0 { g.sendAndComplete((0..<frames).map { TestFrames.make(length: 100, seed: $0) }) }
        let expectUsed = frames >= 2 ? frames + 1 : frames
        XCTAssertTrue(waitUntil { g.usedIndex(0) == start &+ UInt16(expectUsed) }, "used \(g.usedIndex(0) &- start) of \(expectUsed)")
        let base = try g.stopRing(0)
        var used: [UsedElement] = []
        while let e = g.ring(0).takeRawUsed() { used.append(e) }
        XCTAssertEqual(d.queue("vm", 0).faults, 0)
        return (base, used, start, heads)
    }

    /// One accepted chain consumed, one accepted and unconsumed, the rejected one behind it:
    /// the base is the unconsumed chain's position; the rejected chain is not completed (the
    /// destination reads it again from the base), nothing before the base is missing.
    func testGetVringBaseWithRejectedAndUnconsumedChains() throws {
        let r = try stopWithPending(frames: 1)
        XCTAssertEqual(r.base, UInt32(r.start) + 1, "base = the first accepted chain the device had not taken")
        XCTAssertEqual(r.used.map(\.id), [UInt32(r.heads[0])], "exactly the chains before the base are completed")
    }

    /// Both accepted chains before the rejected one consumed: the rejected one is completed (length
    /// 0) and the base is the last accepted, unconsumed chain's position.
    func testGetVringBaseAfterTheRejectedChainCompleted() throws {
        let r = try stopWithPending(frames: 2)
        XCTAssertEqual(r.base, UInt32(r.start) + 3)
        XCTAssertEqual(r.used.map(\.id), r.heads.prefix(3).map { UInt32($0) })
        XCTAssertEqual(r.used.last?.length, 0, "the rejected chain is completed with length 0")
    }

    /// The avail relay sleeps on the guest's kick. One eventfd given as the kick of both rings,
    /// made blocking again by the frontend after the session made it non-blocking: a kick makes
    /// both epoll entries readable, the first drain empties the counter, and a drain of the second
    /// would block the relay thread. The relay checks before it drains and quarantines the fd: it
    /// polls the rings instead, TX frames keep going, and LOG_ALL off is answered at once.
    func testBlockingSharedKickDoesNotWedgeTheAvailRelay() throws {
        let d = try makeDaemon([.init(id: "vm", link: "sink", migration: Self.availUsed)])
        let g = try d.connect("vm")
        _ = try g.startRing(0)
        _ = try g.startRing(1)
        let shared = try EventFD.make(nonBlocking: false)
        for ring: UInt32 in [0, 1] {
            _ = try g.stopRing(ring)
            _ = try g.frontend.request(.setVringKick, payload: .vringFile(index: ring, hasFD: true), fds: [shared.raw], needReply: true)
        }
        _ = try g.frontend.enableLogging(requireU64Reply: true)
        XCTAssertEqual(d.queue("vm", 1).mode, "relay")
        // The frontend clears O_NONBLOCK on the file the relay shares with it.
        let flags = fcntl(shared.raw, F_GETFL)
        XCTAssertEqual(fcntl(shared.raw, F_SETFL, flags & ~O_NONBLOCK), 0)
        for round in 0..<3 {
            let used = g.usedIndex(1)
            _ = g.send((0..<4).map { TestFrames.make(length: 80, seed: $0) }, ring: 1, kick: false)
            EventFD.signal(shared.raw)
            XCTAssertTrue(waitUntil(2) { g.usedIndex(1) == used &+ 4 }, "round \(round): TX must be served through the avail relay")
        }
        XCTAssertGreaterThan(d.queue("vm", 1).relayErrors ?? 0, 0, "the blocking kick is counted")
        let t = Date()
        try g.frontend.disableLogging()
        XCTAssertLessThan(Date().timeIntervalSince(t), 0.5, "LOG_ALL off answered without waiting for a wedged relay")
        XCTAssertEqual(d.queue("vm", 1).mode, "direct")
    }

    /// A device that cannot move a running ring's avail ring (the kernel vhost-vdpa driver) makes
    /// a relay=avail+used port fail when it is made, with the port and the option named, rather
    /// than at the first LOG_ALL in the middle of a migration.
    func testDeviceThatCannotMoveItsAvailRingIsRefusedAtPortCreation() throws {
        XCTAssertThrowsError(try makeDaemon([.init(id: "kd", link: "loopback", kernelModel: true, migration: Self.availUsed)])) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("'kd'") && text.contains("relay=avail+used"), text)
        }
    }
}
