import Foundation
import Glibc
import XCTest
import Virtio
import CVDPAShims
@testable import SoftNIC

/// A port's `link=tap` against the kernel: a TAP interface the test watches and feeds through a
/// packet socket bound to it (root only; skipped otherwise). TX frames leave straight from the
/// guest's buffers with their virtio-net header, so a large (TSO) frame reaches the interface
/// whole; frames from the interface are read straight into the guest's posted buffers, across
/// several chains with MRG_RXBUF, or through the device's buffer when too few are posted.
final class SoftNICTapTests: SoftNICTestCase {
    /// A packet socket on interface `name`, which is brought up (IPv6 off: no noise frames).
    final class PacketSocket {
        let fd: Int32
        init(interface name: String) throws {
            try? "1\n".write(toFile: "/proc/sys/net/ipv6/conf/\(name)/disable_ipv6", atomically: false, encoding: .utf8)
            let up = Process()
            up.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            up.arguments = ["link", "set", "dev", name, "up"]
            try up.run()
            up.waitUntilExit()
            guard up.terminationStatus == 0 else { throw XCTSkip("cannot bring \(name) up") }
            fd = cvdpa_packet_socket(name)
            guard fd >= 0 else { throw XCTSkip("no packet socket on \(name) (errno \(errno))") }
        }
        deinit { close(fd) }

        func send(_ frame: [UInt8]) { XCTAssertEqual(Glibc.send(fd, frame, frame.count, 0), frame.count) }

        /// The next frame the interface received whose ethertype is `type` (others skipped).
        func receive(type: UInt16, timeout: Double = 5) -> [UInt8]? {
            var buf = [UInt8](repeating: 0, count: 70_000)
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 100) == 1 else { continue }
                let n = recv(fd, &buf, buf.count, 0)
                if n >= 14 && UInt16(buf[12]) << 8 | UInt16(buf[13]) == type { return Array(buf[0..<n]) }
            }
            return nil
        }
    }

    func testALargeTSOFrameReachesTheInterfaceWholeAndPlainFramesAsTheyAre() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t", features: Features.all | VirtioNetFeature.offloads)
        let sock = try PacketSocket(interface: name)
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(20000, seed: 9))
        g.sendAndComplete([p.bytes], layout: .split, headers: [netHeaderBytes(p.header(gsoSize: 1448))])
        XCTAssertEqual(sock.receive(type: 0x0800), p.bytes, "the 20 KB TCP frame arrives whole: the kernel holds it as one GSO packet")
        let plain = TestFrames.make(length: 1400, seed: 10)
        g.sendAndComplete([plain], layout: .indirect)
        XCTAssertEqual(sock.receive(type: UInt16(plain[12]) << 8 | UInt16(plain[13])), plain)
        XCTAssertEqual(stats(env, "t", 1, until: { $0.packets == 2 }).packets, 2)
    }

    func testFramesFromTheInterfaceLandInThePostedBuffersWithOrWithoutEnoughPosted() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t")
        let sock = try PacketSocket(interface: name)
        // 40 buffers of 512 bytes hold the largest frame the tap may hand over (9018): frames are
        // read straight into them, a 1500-byte one across 3 chains.
        g.postRX(count: 40, size: 512)
        let frames = (0..<3).map { tapFrame(1500 - 300 * $0, seed: 20 + $0) }
        for f in frames { sock.send(f) }
        let got = g.receive(3)
        XCTAssertEqual(got.map(\.frame), frames)
        XCTAssertEqual(got.map(\.numBuffers), [3, 3, 2], "num_buffers says how many chains each frame took")
        XCTAssertEqual(got.map { Array($0.header[0..<10]) }, Array(repeating: [UInt8](repeating: 0, count: 10), count: 3))
        XCTAssertEqual(env.device("t").tapDirectFrames(), [3], "all three read straight into the guest's buffers")
        XCTAssertEqual(stats(env, "t", 0, until: { $0.packets == 3 }).packets, 3)
    }

    func testZeroCopyOffCopiesEveryFrameThroughTheDeviceBuffer() throws {
        XCTAssertEqual(try LinkSpec.parse("tap:ifname=x:zerocopy=off"), .tap(ifname: "x", zeroCopy: false))
        XCTAssertEqual(try LinkSpec.parse("tap:zerocopy=on"), .tap(ifname: nil, zeroCopy: true))
        XCTAssertEqual(LinkSpec.tap(ifname: "x", zeroCopy: false).description, "tap:ifname=x:zerocopy=off")
        XCTAssertThrowsError(try LinkSpec.parse("tap:zerocopy=maybe"))
        let (env, name) = try tapPort(":zerocopy=off")
        let g = try env.connectAndStart("t", features: Features.all | VirtioNetFeature.offloads)
        let sock = try PacketSocket(interface: name)
        g.postRX(count: 40, size: 512)
        let f = tapFrame(1500, seed: 40)
        sock.send(f)
        XCTAssertEqual(g.receive(1).map(\.frame), [f])
        XCTAssertEqual(env.device("t").tapDirectFrames(), [0])
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(12000, seed: 41))
        g.sendAndComplete([p.bytes], headers: [netHeaderBytes(p.header(gsoSize: 1448))])
        XCTAssertEqual(sock.receive(type: 0x0800), p.bytes, "the copying path passes the header too")
    }

    func testWithFewerBuffersPostedThanTheLargestFrameAFrameStillLandsWhole() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t")
        let sock = try PacketSocket(interface: name)
        // 2 buffers of 1024: less than the largest frame, so the frame goes through the device's
        // buffer (RXWriter checks it fits before writing), across both chains.
        g.postRX(count: 2, size: 1024)
        let f = tapFrame(1500, seed: 30)
        sock.send(f)
        let got = g.receive(1)
        XCTAssertEqual(got.map(\.frame), [f])
        XCTAssertEqual(got.map(\.numBuffers), [2])
        XCTAssertEqual(env.device("t").tapDirectFrames(), [0], "through the device's buffer")
        XCTAssertEqual(stats(env, "t", 0, until: { $0.packets == 1 }).packets, 1)
    }

    func testTwoQueuePairsEachReadStraightIntoTheirOwnRing() throws {
        guard getuid() == 0, access("/dev/net/tun", R_OK | W_OK) == 0 else { throw XCTSkip("needs root and /dev/net/tun") }
        let name = "vdt\(UInt32.random(in: 0...0xFFFFFF))"
        let env = try makeDaemon([.init(id: "t", link: "tap:ifname=\(name)", queuePairs: 2)])
        let g = try env.connect("t")
        for i: UInt32 in 0..<4 { try g.startRing(i) }
        let sock = try PacketSocket(interface: name)
        // Frames go round-robin over the two RX rings; each ring reads straight into its own
        // posted chains. (That each ring keeps its own window across frames, rather than one
        // rebuilt at every frame, saves work but shows in no result: this checks correctness.)
        g.postRX(count: 40, size: 512, ring: 0)
        g.postRX(count: 40, size: 512, ring: 2)
        let frames = (0..<6).map { tapFrame(700 + 100 * $0, seed: 50 + $0) }
        for f in frames { sock.send(f) }
        // Which ring takes which frame is the engine's round-robin, whose phase also moves when a
        // read finds no frame yet: the split is not asserted, only that both rings took frames
        // straight into their own chains and that every frame arrives once, whole.
        XCTAssertTrue(waitUntil(10) { env.device("t").tapDirectFrames().reduce(0, +) == 6 }, "6 frames read straight into the rings")
        let direct = env.device("t").tapDirectFrames()
        XCTAssertTrue(direct[0] > 0 && direct[1] > 0, "both rings took frames: \(direct)")
        let a = g.receive(Int(direct[0]), ring: 0), b = g.receive(Int(direct[1]), ring: 2)
        XCTAssertEqual((a + b).count, 6)
        XCTAssertEqual(Set((a + b).map(\.frame)), Set(frames), "every frame arrives once, whole")
    }
}
