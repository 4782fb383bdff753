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

/// The SoftNIC's data path end to end: a daemon with SoftNIC ports, driven by in-process guests.
final class SoftNICDataPathTests: XCTestCase {
    var env: SoftNICTestDaemon?

    override func tearDown() {
        env?.stop()
        env = nil  // XCTest keeps test cases alive: drop the daemon (threads, fds, mappings) now
    }

    func makeDaemon(_ defs: [SoftNICTestDaemon.PortDef]) throws -> SoftNICTestDaemon {
        let d = try SoftNICTestDaemon(defs)
        env = d
        return d
    }

    /// Waits until a queue's stats satisfy `condition` (the TX path adds its counters just
    /// after publishing a batch), then returns them.
    @discardableResult
    func stats(_ env: SoftNICTestDaemon, _ id: String, _ q: Int, until condition: (QueueStats) -> Bool = { _ in true },
               file: StaticString = #filePath, line: UInt = #line) -> QueueStats {
        let ok = waitUntil(5) { condition(env.queue(id, q)) }
        let s = env.queue(id, q)
        XCTAssertTrue(ok, "queue \(q) of \(id): stats never got there: \(s)", file: file, line: line)
        return s
    }

    func assertNoDrops(_ s: QueueStats, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(s.drops.values.reduce(0, +), 0, "unexpected drops \(s.drops)", file: file, line: line)
        XCTAssertEqual(s.faults, 0, "unexpected fault: \(s.error ?? "")", file: file, line: line)
        XCTAssertNil(s.error, file: file, line: line)
    }

    // MARK: 1. loopback

    func testLoopbackReturnsEachFrameBehindA12ByteHeaderAndCountsIt() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.all)
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 64)

        let lengths = [14, 42, 60, 64, 100, 128, 256, 512, 777, 1000, 1500, 1514, 2036]
        var frames: [[UInt8]] = []
        for i in 0..<39 { frames.append(TestFrames.make(length: lengths[i % lengths.count], seed: i)) }
        // Three descriptor layouts, each a third of the frames.
        g.send(Array(frames[0..<13]), layout: .single)
        g.send(Array(frames[13..<26]), layout: .split)
        g.send(Array(frames[26..<39]), layout: .indirect)

        let tx = g.waitUsed(ring: 1, count: frames.count)
        XCTAssertEqual(tx.count, frames.count)
        let rx = g.receive(frames.count)
        XCTAssertEqual(rx.count, frames.count)
        for (i, (sent, got)) in zip(frames, rx).enumerated() {
            XCTAssertEqual(got.frame, sent, "frame \(i) (\(sent.count) bytes) came back different")
            XCTAssertEqual(Array(got.header[0..<10]), [UInt8](repeating: 0, count: 10), "frame \(i): header fields")
            XCTAssertEqual(got.numBuffers, 1, "frame \(i): num_buffers")
            XCTAssertEqual(got.elements.count, 1)
            XCTAssertEqual(got.elements.first?.length, UInt32(netHeaderLength + sent.count), "frame \(i): used.len")
        }

        let bytes = UInt64(frames.reduce(0) { $0 + $1.count })
        let n = UInt64(frames.count)
        let txStats = stats(env, "lb0", 1) { $0.packets == n }
        let rxStats = stats(env, "lb0", 0) { $0.packets == n }
        XCTAssertEqual(txStats.direction, "tx")
        XCTAssertEqual(rxStats.direction, "rx")
        XCTAssertEqual(txStats.bytes, bytes, "TX bytes count frames without the virtio-net header")
        XCTAssertEqual(rxStats.bytes, bytes, "RX bytes count frames without the virtio-net header")
        XCTAssertEqual(txStats.mode, "direct")
        XCTAssertEqual(rxStats.mode, "direct")
        assertNoDrops(txStats)
        assertNoDrops(rxStats)
        // The device's own counters agree with what the daemon reports.
        let c = env.device("lb0").counters()
        XCTAssertEqual(c[1].packets, n)
        XCTAssertEqual(c[1].bytes, bytes)
        XCTAssertEqual(c[0].packets, n)
        XCTAssertEqual(c[0].bytes, bytes)
        XCTAssertEqual(c[0].drops, rxStats.drops)
    }

    /// (Fixed: DMAEngine.deliver wrote num_buffers only when MRG_RXBUF was negotiated, so without
    /// it the 12-byte header carried num_buffers = 0.)
    /// virtio 1.2, 5.1.6.4.1: "If VIRTIO_NET_F_MRG_RXBUF has not been negotiated, the device
    /// MUST set num_buffers to 1" (the 12-byte header is used with VERSION_1 anyway).
    func testLoopbackWithoutMergeableBuffersSetsNumBuffersToOne() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.base | Features.eventIdx)
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 8)
        let frames = (0..<3).map { TestFrames.make(length: 60 + 100 * $0, seed: 100 + $0) }
        g.send(frames)
        let rx = g.receive(frames.count)
        for (i, (sent, got)) in zip(frames, rx).enumerated() {
            XCTAssertEqual(got.frame, sent, "frame \(i)")
            XCTAssertEqual(got.numBuffers, 1, "frame \(i): num_buffers must be 1 without MRG_RXBUF (virtio 1.2 5.1.6.4.1)")
        }
    }

    func testLoopbackDropsFramesAsNoBufferWhileTheRXRingIsEmpty() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0")
        try g.startRing(0)
        try g.startRing(1)
        g.sendAndComplete((0..<3).map { TestFrames.make(length: 60, seed: $0) })
        let rx = stats(env, "lb0", 0) { $0.drops["noBuffer"] == 3 }
        XCTAssertEqual(rx.packets, 0)
        XCTAssertEqual(rx.faults, 0)
        XCTAssertEqual(stats(env, "lb0", 1) { $0.packets == 3 }.packets, 3, "TX sent them")
        // Frames sent once buffers exist arrive; the dropped ones are gone.
        g.postRX(count: 4)
        let later = TestFrames.make(length: 60, seed: 3)
        g.send([later])
        let got = g.receive(1)
        XCTAssertEqual(got.first?.frame, later)
    }

    // MARK: 2. mergeable RX buffers

    func testMergeableRXBuffersCarryALargeFrameAndNumBuffersCountsThem() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.all)
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 48, size: 256)

        let f1000 = TestFrames.make(length: 1000, seed: 7)
        g.send([f1000])
        let rx1 = g.receive(1)
        XCTAssertEqual(rx1.first?.frame, f1000)
        XCTAssertEqual(rx1.first?.numBuffers, 4, "12 + 1000 bytes over 256-byte buffers take 4")
        XCTAssertEqual(rx1.first?.elements.map(\.length), [256, 256, 256, 244])

        // A jumbo frame: 12 + 9018 bytes take 36 buffers.
        let jumbo = TestFrames.make(length: 9018, seed: 8)
        g.send([jumbo], layout: .split)
        let rx2 = g.receive(1)
        XCTAssertEqual(rx2.first?.frame, jumbo)
        XCTAssertEqual(rx2.first?.numBuffers, 36)
        XCTAssertEqual(rx2.first?.elements.count, 36)
        XCTAssertEqual(rx2.first?.elements.last?.length, UInt32((12 + 9018) - 35 * 256))

        let rx = stats(env, "lb0", 0) { $0.packets == 2 }
        XCTAssertEqual(rx.bytes, 1000 + 9018)
        assertNoDrops(rx)
    }

    func testWithoutMergeableAFrameLargerThanTheBufferIsDroppedAsBufferTooSmall() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.base | Features.eventIdx | Features.indirect)
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 4, size: 256)

        g.sendAndComplete([TestFrames.make(length: 1000, seed: 1)])
        let rx = stats(env, "lb0", 0) { $0.drops["bufferTooSmall"] == 1 }
        XCTAssertEqual(rx.drops["bufferTooSmall"], 1)
        XCTAssertEqual(rx.packets, 0)
        XCTAssertEqual(rx.faults, 0, "a frame too large for the buffer is a drop, not a fault")
        usleep(50_000)
        XCTAssertEqual(g.usedIndex(0), 0, "nothing of the dropped frame reaches the guest")
        // The TX side sent it: the drop is the receiver's.
        XCTAssertEqual(stats(env, "lb0", 1) { $0.packets == 1 }.bytes, 1000)

        // The ring still works: a frame that fits arrives whole.
        let small = TestFrames.make(length: 200, seed: 2)
        g.send([small])
        let got = g.receive(1)
        XCTAssertEqual(got.first?.frame, small)
        XCTAssertEqual(got.first?.elements.count, 1)
    }

    // MARK: 3. source link

    func checkSourceFrames(_ frames: [ReceivedFrame], dst: [UInt8], src: [UInt8], size: Int,
                           file: StaticString = #filePath, line: UInt = #line) -> [UInt64] {
        var seqs: [UInt64] = []
        for (i, f) in frames.enumerated() {
            XCTAssertEqual(f.frame.count, size, "frame \(i): size", file: file, line: line)
            guard f.frame.count >= 22 else { continue }
            XCTAssertEqual(Array(f.frame[0..<6]), dst, "frame \(i): destination MAC", file: file, line: line)
            XCTAssertEqual(Array(f.frame[6..<12]), src, "frame \(i): source MAC = the port's MAC", file: file, line: line)
            XCTAssertEqual(Array(f.frame[12..<14]), [0x88, 0xB5], "frame \(i): ethertype", file: file, line: line)
            XCTAssertTrue(f.frame[22...].allSatisfy { $0 == 0xA5 }, "frame \(i): 0xA5 filler", file: file, line: line)
            XCTAssertEqual(Array(f.header[0..<10]), [UInt8](repeating: 0, count: 10), file: file, line: line)
            XCTAssertEqual(f.numBuffers, 1, file: file, line: line)
            seqs.append(TestFrames.be64(f.frame[14..<22]))
        }
        for i in seqs.indices.dropFirst() {
            XCTAssertEqual(seqs[i], seqs[i - 1] &+ 1, "sequence numbers must be consecutive (frame \(i))", file: file, line: line)
        }
        if let first = seqs.first {
            XCTAssertTrue(seqs.allSatisfy { $0 >> 48 == first >> 48 }, "one epoch within one run", file: file, line: line)
        }
        return seqs
    }

    func testSourceLinkGeneratesTheDocumentedFramesAndANewEpochAfterRestart() throws {
        let guestMAC: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        let env = try makeDaemon([.init(id: "src0", link: "source:size=128", mac: guestMAC),
                                  .init(id: "src1", link: "source:size=128")])
        let mac0 = TestFrames.macBytes(env.device("src0").mac)
        let mac1 = TestFrames.macBytes(env.device("src1").mac)
        XCTAssertNotEqual(mac0, mac1, "ports get different MACs")
        XCTAssertEqual(mac0[0] & 0x03, 0x02, "a locally administered unicast MAC")

        let g = try env.connect("src0")
        try g.startRing(0)
        g.postRX(count: 32)
        let first = checkSourceFrames(g.receive(32), dst: guestMAC, src: mac0, size: 128)
        g.postRX(count: 32)
        let second = checkSourceFrames(g.receive(32), dst: guestMAC, src: mac0, size: 128)
        XCTAssertEqual(second.first, first.last.map { $0 &+ 1 }, "the sequence continues across refills")
        let rx = stats(env, "src0", 0) { $0.packets == 64 }
        XCTAssertEqual(rx.bytes, 64 * 128)
        XCTAssertEqual(rx.faults, 0)

        // Stop and restart the RX ring: the generator starts a new epoch.
        XCTAssertEqual(try g.stopRing(0), 64, "GET_VRING_BASE: all 64 buffers were consumed")
        try g.startRing(0)
        g.postRX(count: 8)
        let third = checkSourceFrames(g.receive(8), dst: guestMAC, src: mac0, size: 128)
        if let a = first.first, let b = third.first {
            XCTAssertNotEqual(a >> 48, b >> 48, "a restarted ring gets a new epoch (0x\(String(a, radix: 16)) vs 0x\(String(b, radix: 16)))")
            XCTAssertFalse(Set(first + second).contains(b), "sequence numbers never repeat across restarts")
        }

        // Without mac=, the destination is broadcast.
        let h = try env.connect("src1")
        try h.startRing(0)
        h.postRX(count: 4)
        _ = checkSourceFrames(h.receive(4), dst: [UInt8](repeating: 0xff, count: 6), src: mac1, size: 128)
    }

    // MARK: 4. sink link

    func testSinkLinkCountsFramesWithoutTheHeaderAndDropsRuntsAndGiants() throws {
        let env = try makeDaemon([.init(id: "sink0", link: "sink")])
        let g = try env.connect("sink0")
        try g.startRing(0)
        try g.startRing(1)
        let good = [14, 60, 100, 1514, 9018].enumerated().map { TestFrames.make(length: $1, seed: $0) }
        g.sendAndComplete(Array(good[0..<2]), layout: .single)
        g.sendAndComplete(Array(good[2..<4]), layout: .split)
        g.sendAndComplete(Array(good[4...]), layout: .indirect)
        let runt = Array(TestFrames.make(length: 14, seed: 9).prefix(13))
        let giant = TestFrames.make(length: 9019, seed: 10)
        g.sendAndComplete([runt, giant])

        let tx = stats(env, "sink0", 1) { $0.packets == 5 && $0.drops["frameTooLarge"] == 1 }
        XCTAssertEqual(tx.packets, 5)
        XCTAssertEqual(tx.bytes, UInt64(good.reduce(0) { $0 + $1.count }), "bytes exclude the 12-byte virtio-net header")
        XCTAssertEqual(tx.drops["runt"], 1)
        XCTAssertEqual(tx.drops["frameTooLarge"], 1)
        XCTAssertEqual(tx.faults, 0)
        XCTAssertEqual(g.usedIndex(1), 7, "every chain, dropped or not, is completed")
        XCTAssertEqual(env.queue("sink0", 0).packets, 0, "a sink delivers nothing")
    }

    // MARK: 5. wire link

    func testWireLinkCarriesFramesBetweenTwoPortsOfOneDaemon() throws {
        // WireHub is process-wide: unique ids keep other tests' wires apart.
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let a = "wa\(tag)", b = "wb\(tag)"
        let env = try makeDaemon([.init(id: a, link: "wire:\(b)"), .init(id: b, link: "wire:\(a)")])
        let ga = try env.connect(a)
        let gb = try env.connect(b)
        for g in [ga, gb] {
            try g.startRing(0)
            try g.startRing(1)
        }

        gb.postRX(count: 8)
        let ab = (0..<5).map { TestFrames.make(length: 64 + 97 * $0, seed: 200 + $0) }
        ga.sendAndComplete(ab)
        XCTAssertEqual(gb.receive(5).map(\.frame), ab, "A → B")

        ga.postRX(count: 8)
        let ba = (0..<3).map { TestFrames.make(length: 1514 - $0, seed: 300 + $0) }
        gb.sendAndComplete(ba, layout: .split)
        XCTAssertEqual(ga.receive(3).map(\.frame), ba, "B → A")

        // B has 3 buffers left; 6 frames: 3 arrive now, 3 wait on the wire until B posts more.
        let burst = (0..<6).map { TestFrames.make(length: 100, seed: 400 + $0) }
        ga.sendAndComplete(burst)
        let early = gb.receive(3)
        XCTAssertEqual(early.map(\.frame), Array(burst[0..<3]))
        gb.postRX(count: 3)
        XCTAssertEqual(gb.receive(3).map(\.frame), Array(burst[3...]), "frames held on the wire arrive once B posts buffers")

        XCTAssertEqual(stats(env, a, 1) { $0.packets == 11 }.packets, 11)
        XCTAssertEqual(stats(env, b, 0) { $0.packets == 11 }.packets, 11)
        XCTAssertEqual(stats(env, b, 1) { $0.packets == 3 }.packets, 3)
        XCTAssertEqual(stats(env, a, 0) { $0.packets == 3 }.packets, 3)
    }

    // MARK: 6. interrupts

    func testEventIdxInterruptsExactlyWhenUsedEventIsPassed() throws {
        let env = try makeDaemon([.init(id: "sink0", link: "sink")])
        let g = try env.connect("sink0", features: Features.all)
        let tx = try g.startRing(1)
        let call = g.callFDs[1]!
        tx.setUsedEvent(4)  // "interrupt me when used.idx passes 4"
        EventFD.drain(call)

        for i in 0..<4 { g.sendAndComplete([TestFrames.make(length: 60, seed: i)]) }
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call), "no interrupt while used.idx <= used_event")
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 0)

        g.sendAndComplete([TestFrames.make(length: 60, seed: 4)])  // used.idx 4 → 5 passes used_event
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 1, timeout: .seconds(2)), 0, "interrupt when used.idx passes used_event")
        // The counter is bumped just after the eventfd is signalled.
        XCTAssertTrue(waitUntil(1) { env.queue("sink0", 1).interrupts == 1 })

        g.sendAndComplete([TestFrames.make(length: 60, seed: 5)])  // 5 → 6: used_event (4) is behind
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call), "no second interrupt for the same used_event")
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 1)

        // A batch of 5 crossing used_event once raises one interrupt.
        tx.setUsedEvent(8)
        g.sendAndComplete((0..<5).map { TestFrames.make(length: 60, seed: 10 + $0) })  // 6 → 11
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 1, timeout: .seconds(2)), 0)
        XCTAssertTrue(waitUntil(1) { env.queue("sink0", 1).interrupts == 2 })
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call))
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 2)
    }

    func testNoInterruptFlagSuppressesInterruptsWithoutEventIdx() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.base | Features.mrg | Features.indirect)
        XCTAssertFalse(g.eventIdx)
        let rx = try g.startRing(0)
        let tx = try g.startRing(1)
        rx.disableInterrupts()
        tx.disableInterrupts()
        let rxCall = g.callFDs[0]!, txCall = g.callFDs[1]!
        EventFD.drain(rxCall)
        EventFD.drain(txCall)
        g.postRX(count: 32)

        for i in 0..<5 { g.sendAndComplete([TestFrames.make(length: 80, seed: i)]) }
        g.sendAndComplete((5..<10).map { TestFrames.make(length: 80, seed: $0) })
        XCTAssertEqual(g.receive(10).count, 10)
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(txCall), "TX: NO_INTERRUPT set, yet the call eventfd was signalled")
        XCTAssertFalse(eventFDReadable(rxCall), "RX: NO_INTERRUPT set, yet the call eventfd was signalled")
        XCTAssertEqual(env.queue("lb0", 0).interrupts, 0)
        XCTAssertEqual(env.queue("lb0", 1).interrupts, 0)

        // Clearing the flag on RX only: RX interrupts, TX stays quiet.
        _ = rx.enableInterrupts()
        g.sendAndComplete([TestFrames.make(length: 80, seed: 99)])
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 0, timeout: .seconds(2)), 0, "RX interrupt once NO_INTERRUPT is cleared")
        XCTAssertEqual(g.receive(1).count, 1)
        XCTAssertTrue(waitUntil(1) { env.queue("lb0", 0).interrupts == 1 })
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(txCall))
        XCTAssertEqual(env.queue("lb0", 0).interrupts, 1)
        XCTAssertEqual(env.queue("lb0", 1).interrupts, 0)
    }

    // MARK: 7. GET_VRING_BASE

    func testGetVringBaseReturnsNextAvailIndexAndTheRingIsNotWrittenAfterwards() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0")
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 16)
        let frames = (0..<5).map { TestFrames.make(length: 90, seed: $0) }
        g.sendAndComplete(frames)
        XCTAssertEqual(g.receive(5).map(\.frame), frames)
        // Two more chains published without a kick: the device may or may not have taken them.
        g.send([TestFrames.make(length: 90, seed: 5), TestFrames.make(length: 90, seed: 6)], kick: false)
        usleep(20_000)

        let txBase = try g.stopRing(1)
        let txUsed = g.usedIndex(1)
        XCTAssertEqual(txBase, UInt32(txUsed), "GET_VRING_BASE = the next avail index = chains consumed (each TX chain is completed)")
        XCTAssertTrue((5...7).contains(txBase), "base \(txBase)")
        let txArea = g.usedArea(1)
        let rxArea = g.usedArea(0)
        let rxUsed = g.usedIndex(0)

        // More work after the stop: nothing may be written to the stopped ring.
        g.send((0..<3).map { TestFrames.make(length: 90, seed: 10 + $0) })
        g.kick(1)
        usleep(100_000)
        XCTAssertEqual(g.usedIndex(1), txUsed, "used.idx moved after GET_VRING_BASE")
        XCTAssertEqual(g.usedArea(1), txArea, "the used ring was written after GET_VRING_BASE")
        XCTAssertEqual(g.usedIndex(0), rxUsed, "no more frames may come back: TX is stopped")
        XCTAssertEqual(g.usedArea(0), rxArea)

        let rxBase = try g.stopRing(0)
        XCTAssertEqual(rxBase, UInt32(g.usedIndex(0)), "RX: GET_VRING_BASE = buffers consumed")
        XCTAssertEqual(rxBase, txBase, "every frame sent took one RX buffer")
    }

    func testStoppedRXRingIsNotWrittenWhileTXKeepsRunning() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0")
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 16)
        g.sendAndComplete([TestFrames.make(length: 70, seed: 1), TestFrames.make(length: 70, seed: 2)])
        XCTAssertEqual(g.receive(2).count, 2)

        XCTAssertEqual(try g.stopRing(0), 2)
        let rxArea = g.usedArea(0)
        let before = env.queue("lb0", 0).drops["noBuffer"] ?? 0
        g.sendAndComplete((0..<4).map { TestFrames.make(length: 70, seed: 10 + $0) })
        XCTAssertEqual(g.usedIndex(1), 6, "TX keeps running")
        let rx = stats(env, "lb0", 0) { ($0.drops["noBuffer"] ?? 0) == before + 4 }
        XCTAssertEqual(rx.drops["noBuffer"], before + 4, "frames for a stopped RX ring are dropped")
        XCTAssertEqual(rx.mode, "stopped")
        usleep(50_000)
        XCTAssertEqual(g.usedArea(0), rxArea, "the stopped RX ring was written")
    }

    // MARK: driving the engine synchronously (the session fuzz target's hook)

    func testServiceUntilIdleServesWhatTheRingsHoldBeforeItReturns() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.all)
        try g.startRing(0)
        try g.startRing(1)
        g.postRX(count: 8)
        let frames = (0..<5).map { TestFrames.make(length: 60 + $0, seed: $0) }
        // No kick: the engine may be asleep with notifications on, or still polling.
        g.send(frames, kick: false)
        let moved = env.device("lb0").serviceUntilIdle()
        // Settled when it returns: no waiting, all five completed on TX and looped back to RX.
        XCTAssertEqual(g.usedIndex(1), 5, "TX used index right after serviceUntilIdle")
        XCTAssertEqual(g.usedIndex(0), 5, "RX used index right after serviceUntilIdle")
        XCTAssertLessThanOrEqual(moved, 5, "it cannot have moved more chains than were posted")
        // Nothing left: a second call finds no work.
        XCTAssertEqual(env.device("lb0").serviceUntilIdle(), 0)
        XCTAssertEqual(g.receive(5).map(\.frame), frames)
    }
}

/// Multi-queue: the second queue pair works on its own rings.
final class SoftNICMultiQueueTests: XCTestCase {
    var daemon: SoftNICTestDaemon?

    override func tearDown() {
        daemon?.stop()
        daemon = nil
    }

    func testSecondQueuePairLoopsBack() throws {
        let d = try SoftNICTestDaemon([.init(id: "mq", link: "loopback", queuePairs: 2)])
        daemon = d
        let g = try d.connect("mq")
        for i: UInt32 in 0..<4 { try g.startRing(i) }
        g.postRX(count: 8, ring: 2)
        let frames = (0..<8).map { TestFrames.make(length: 80, seed: 100 + $0) }
        g.sendAndComplete(frames, ring: 3)
        let got = g.receive(8, ring: 2)
        XCTAssertEqual(got.map(\.frame), frames)
        XCTAssertEqual(d.counters("mq", 3).packets, 8)
        XCTAssertEqual(d.counters("mq", 2).packets, 8)
        XCTAssertEqual(d.counters("mq", 1).packets, 0, "pair 0 saw nothing")
        XCTAssertEqual(d.counters("mq", 0).packets, 0)
    }
}
