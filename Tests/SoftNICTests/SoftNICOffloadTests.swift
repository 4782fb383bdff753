import XCTest
import Virtio
@testable import SoftNIC
@testable import VDPA

/// The SoftNIC's offloads end to end through vhost-user: TX headers checked (bad ones dropped
/// and counted, the ring going on), large frames and partial checksums handed as they are to a
/// guest that takes them, and cut or completed by the device for one that does not (loopback
/// and wire). The software work itself is tested in OffloadTests.
final class SoftNICOffloadTests: SoftNICTestCase {
    static let offloading = Features.all | VirtioNetFeature.offloads
    /// Sends offloads (CSUM, HOST_*) but takes none (no GUEST_*).
    static let sendsOnly = Features.all | VirtioNetFeature.hostOffloads

    func header(of f: ReceivedFrame) -> VirtioNetHeader {
        f.header.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress!, size: netHeaderLength) }
    }

    /// Checks segments of `p` cut at `mss`: payload in order and whole, checksums that verify.
    func checkSegments(_ p: OffloadPacket, _ frames: [ReceivedFrame], mss: Int, file: StaticString = #filePath, line: UInt = #line) {
        var payload: [UInt8] = []
        for (i, f) in frames.enumerated() {
            let s = f.frame
            XCTAssertEqual(header(of: f), VirtioNetHeader(numBuffers: header(of: f).numBuffers),
                           "segment \(i): the guest gets a plain header", file: file, line: line)
            XCTAssertLessThanOrEqual(s.count - p.payloadOffset, mss, "segment \(i) payload", file: file, line: line)
            payload += s[p.payloadOffset...]
            let got = UInt16(s[p.l4 + p.csumOffset]) << 8 | UInt16(s[p.l4 + p.csumOffset + 1])
            XCTAssertEqual(got, p.expectedChecksum(s), "segment \(i): TCP checksum", file: file, line: line)
            if !p.isIPv6 { XCTAssertEqual(PlainChecksum.checksum(s[p.l3..<(p.l3 + 20)]), 0, "segment \(i): IPv4 header checksum", file: file, line: line) }
        }
        XCTAssertEqual(payload, p.payload, "the segments carry the payload whole and in order", file: file, line: line)
    }

    func testBadTXHeadersAreDroppedAndCountedWhileTheOtherFramesPass() throws {
        let env = try makeDaemon([.init(id: "p", link: "loopback")])
        let g = try env.connectAndStart("p", features: Self.offloading)
        g.postRX(count: 16, size: 4096)
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(600, seed: 1))
        var gsoSizeZero = p.header(gsoSize: 1448)
        gsoSizeZero.gsoSize = 0
        var csumBeyond = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsCsum, csumStart: UInt16(p.bytes.count), csumOffset: 16)
        csumBeyond.hdrLen = 0
        var hdrLenBeyond = p.header(gsoSize: 1448)
        hdrLenBeyond.hdrLen = UInt16(p.bytes.count + 1)
        let good = (0..<4).map { TestFrames.make(length: 200 + $0, seed: 10 + $0) }
        let plain = netHeaderBytes(VirtioNetHeader())
        g.sendAndComplete([good[0], p.bytes, good[1], p.bytes, good[2], p.bytes, good[3]],
                          headers: [plain, netHeaderBytes(gsoSizeZero), plain, netHeaderBytes(csumBeyond), plain, netHeaderBytes(hdrLenBeyond), plain])
        XCTAssertEqual(g.receive(4).map(\.frame), good, "the frames around the bad ones arrive intact and in order")
        let tx = stats(env, "p", 1) { $0.drops["badHeader"] == 3 }
        XCTAssertEqual(tx.drops["badHeader"], 3, "each bad header dropped and counted")
        XCTAssertEqual(tx.packets, 4)
        XCTAssertEqual(tx.faults, 0, "a bad header is the frame's problem, not the ring's")

        // Without CSUM negotiated, a header asking for a checksum is refused too.
        let env2 = try makeDaemon([.init(id: "q", link: "loopback")])
        let g2 = try env2.connectAndStart("q", features: Features.all)
        g2.postRX(count: 4, size: 4096)
        g2.sendAndComplete([p.bytes, good[0]], headers: [netHeaderBytes(p.header(gsoSize: 0, type: VirtioNetHeader.gsoNone)), plain])
        XCTAssertEqual(g2.receive(1).map(\.frame), [good[0]])
        XCTAssertEqual(stats(env2, "q", 1, until: { $0.drops["badHeader"] == 1 }).drops["badHeader"], 1)
    }

    func testLoopbackHandsALargeFrameAsItIsToAGuestThatTakesIt() throws {
        let env = try makeDaemon([.init(id: "p", link: "loopback")])
        let g = try env.connectAndStart("p", features: Self.offloading)
        g.postRX(count: 32, size: 4096)
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(20000, seed: 2))
        let h = p.header(gsoSize: 1448)
        g.sendAndComplete([p.bytes], headers: [netHeaderBytes(h)])
        let got = g.receive(1)
        XCTAssertEqual(got.first?.frame, p.bytes, "the large frame arrives whole, its checksum still partial")
        var expected = h
        expected.numBuffers = got.first.map { header(of: $0).numBuffers } ?? 0
        XCTAssertEqual(got.first.map(header(of:)), expected, "with the header its sender wrote")
        XCTAssertEqual(stats(env, "p", 0, until: { $0.packets == 1 }).packets, 1)
    }

    func testLoopbackCutsAndChecksumsForAGuestThatSendsOffloadsButTakesNone() throws {
        let env = try makeDaemon([.init(id: "p", link: "loopback")])
        let g = try env.connectAndStart("p", features: Self.sendsOnly)
        g.postRX(count: 64, size: 2048)
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(10000, seed: 3))
        let partial = OffloadPacket.make(payload: OffloadPacket.bytes(900, seed: 4))
        g.sendAndComplete([p.bytes, partial.bytes],
                          headers: [netHeaderBytes(p.header(gsoSize: 1448)), netHeaderBytes(partial.header(gsoSize: 0, type: VirtioNetHeader.gsoNone))])
        let got = g.receive(8)
        checkSegments(p, Array(got[0..<7]), mss: 1448)
        let c = got[7].frame
        XCTAssertEqual(UInt16(c[partial.l4 + 16]) << 8 | UInt16(c[partial.l4 + 17]), partial.expectedChecksum(c),
                       "the partial checksum completed by the device")
        XCTAssertEqual(header(of: got[7]).flags, 0)
        XCTAssertEqual(stats(env, "p", 0, until: { $0.packets == 8 }).packets, 8, "7 segments and 1 frame delivered")
        XCTAssertEqual(stats(env, "p", 1, until: { $0.packets == 2 }).packets, 2, "2 frames sent")
    }

    func testWireCutsForTheGuestWithoutOffloadsAndNeverDeliversASegmentTwice() throws {
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let a = "oa\(tag)", b = "ob\(tag)"
        let env = try makeDaemon([.init(id: a, link: "wire:\(b)"), .init(id: b, link: "wire:\(a)")])
        let ga = try env.connectAndStart(a, features: Self.offloading)
        let gb = try env.connectAndStart(b, features: Features.all)
        let p = OffloadPacket.make(ipv6: true, payload: OffloadPacket.bytes(30000, seed: 5))
        // B has buffers for 5 of the 21 segments: they arrive, the rest wait on the wire.
        gb.postRX(count: 5, size: 2048)
        ga.sendAndComplete([p.bytes], headers: [netHeaderBytes(p.header(gsoSize: 1440))])
        var got = gb.receive(5)
        gb.postRX(count: 40, size: 2048)
        got += gb.receive(16)
        checkSegments(p, got, mss: 1440)

        // A frame whose header says TCP over IPv4 but that is not: dropped as a bad offload at B.
        var arp = TestFrames.make(length: 400, seed: 6)
        arp[12] = 0x08
        arp[13] = 0x06
        let next = TestFrames.make(length: 300, seed: 7)
        ga.sendAndComplete([arp, next], headers: [netHeaderBytes(p.header(gsoSize: 100, type: VirtioNetHeader.gsoTCPv4)), netHeaderBytes(VirtioNetHeader())])
        XCTAssertEqual(gb.receive(1).map(\.frame), [next], "the frame after it arrives")
        XCTAssertEqual(stats(env, b, 0, until: { $0.drops["badOffload"] == 1 }).drops["badOffload"], 1)
        XCTAssertEqual(stats(env, b, 0, until: { $0.packets == 22 }).packets, 22)

        // The other way, B sends plain frames; A (which takes offloads) gets them as they are.
        ga.postRX(count: 4)
        let plain = TestFrames.make(length: 1000, seed: 8)
        gb.sendAndComplete([plain])
        let back = ga.receive(1)
        XCTAssertEqual(back.first?.frame, plain)
        XCTAssertEqual(back.first.map { header(of: $0).flags }, 0)
    }
}
