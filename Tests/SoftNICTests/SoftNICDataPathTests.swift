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

/// The SoftNIC's data path end to end: a daemon with SoftNIC ports, driven by in-process guests
/// (links: SoftNICLinkTests; interrupts: SoftNICInterruptTests).
final class SoftNICDataPathTests: SoftNICTestCase {
    // MARK: loopback

    func testLoopbackReturnsEachFrameBehindA12ByteHeaderAndCountsIt() throws {
        let (env, g) = try startedGuest()
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
        let (env, g) = try startedGuest(features: Features.base | Features.eventIdx)
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
        let (env, g) = try startedGuest()
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

    // MARK: mergeable RX buffers

    func testMergeableRXBuffersCarryALargeFrameAndNumBuffersCountsThem() throws {
        let (env, g) = try startedGuest()
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
        let (env, g) = try startedGuest(features: Features.base | Features.eventIdx | Features.indirect)
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

    // MARK: GET_VRING_BASE

    func testGetVringBaseReturnsNextAvailIndexAndTheRingIsNotWrittenAfterwards() throws {
        let (env, g) = try startedGuest()
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
        let (env, g) = try startedGuest()
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
        let (env, g) = try startedGuest()
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
final class SoftNICMultiQueueTests: SoftNICTestCase {
    func testSecondQueuePairLoopsBack() throws {
        let d = try makeDaemon([.init(id: "mq", link: "loopback", queuePairs: 2)])
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
