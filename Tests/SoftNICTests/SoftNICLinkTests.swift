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

/// The SoftNIC's host links: what a source generates, what a sink counts and drops, and a wire
/// between two ports of one daemon.
final class SoftNICLinkTests: SoftNICTestCase {
    // MARK: source

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

    // MARK: sink

    func testSinkLinkCountsFramesWithoutTheHeaderAndDropsRuntsAndGiants() throws {
        let (env, g) = try startedGuest("sink0", link: "sink")
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

    // MARK: wire

    func testWireLinkCarriesFramesBetweenTwoPortsOfOneDaemon() throws {
        // WireHub is process-wide: unique ids keep other tests' wires apart.
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let a = "wa\(tag)", b = "wb\(tag)"
        let env = try makeDaemon([.init(id: a, link: "wire:\(b)"), .init(id: b, link: "wire:\(a)")])
        let ga = try env.connectAndStart(a)
        let gb = try env.connectAndStart(b)

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
}
