import Foundation
import Glibc
import XCTest
import Virtio
import CVDPAShims
@testable import SoftNIC

/// Hostile input against the offload and zero-copy paths (from the issue 10 review, each shown
/// failing on the code before its fix): RX buffers too small for the header in the middle of the
/// zero-copy window, a buffer on the last byte of guest RAM, tap frames longer than the largest
/// frame, a wire frame that can never fit, DATA_VALID from a sender, two ports on one wire.
final class SoftNICOffloadHardeningTests: SoftNICTestCase {
    typealias PacketSocket = SoftNICTapTests.PacketSocket

    /// Finding 1: a chain that stays in the RX window after a frame becomes the window's first
    /// chain without the "first writable buffer holds the header" check; commitWindow then
    /// stores num_buffers at iov[0].iov_base + 10 (and flags at +0) whatever iov[0]'s length.
    func testZeroCopyRXNeverWritesOutsideThePostedBuffers() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t")           // VERSION_1 + MRG_RXBUF, no offloads: need = 12 + 9018
        let sock = try PacketSocket(interface: name)
        let a = g.alloc(4000), c = g.alloc(9100)
        let b = g.alloc(64)                            // a 1-byte buffer; bytes b+1..<b+64 belong to no buffer
        g.host(b, 64).initializeMemory(as: UInt8.self, repeating: 0xEE, count: 64)
        g.add([DriverBuffer(gpa: a, length: 4000, isWritable: true)], ring: 0)
        g.add([DriverBuffer(gpa: b, length: 1, isWritable: true)], ring: 0)
        g.add([DriverBuffer(gpa: c, length: 9100, isWritable: true)], ring: 0)
        g.ring(0).publish()
        g.kick(0)
        sock.send(tapFrame(100, seed: 1))   // window [A, B, C]: uses A; B and C stay in the window
        _ = g.waitUsed(ring: 0, count: 1)
        sock.send(tapFrame(100, seed: 2))   // window [B, C]: B first, too small for the header
        // The copy path refuses B (its first buffer cannot hold the header): dropped, counted.
        XCTAssertEqual(stats(env, "t", 0, until: { $0.drops["bufferTooSmall", default: 0] >= 1 }).drops["bufferTooSmall"], 1)
        XCTAssertEqual(g.read(b + 1, 63), [UInt8](repeating: 0xEE, count: 63),
                       "the device wrote guest memory outside the 1-byte buffer it was given (num_buffers at b+10)")
        XCTAssertEqual(g.usedIndex(0), 1)
    }

    /// The same 1-byte buffer on the last byte of guest RAM: a store of num_buffers into it would
    /// land past the daemon's mapping of the region (its own heap, or SIGSEGV).
    func testZeroCopyRXBufferOnTheLastByteOfGuestRAM() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t")
        let sock = try PacketSocket(interface: name)
        let a = g.alloc(4000), c = g.alloc(9100)
        let b = g.ram[0].endGPA - 1
        g.add([DriverBuffer(gpa: a, length: 4000, isWritable: true)], ring: 0)
        g.add([DriverBuffer(gpa: b, length: 1, isWritable: true)], ring: 0)
        g.add([DriverBuffer(gpa: c, length: 9100, isWritable: true)], ring: 0)
        g.ring(0).publish()
        g.kick(0)
        sock.send(tapFrame(100, seed: 1))
        _ = g.waitUsed(ring: 0, count: 1)
        sock.send(tapFrame(100, seed: 2))
        XCTAssertEqual(stats(env, "t", 0, until: { $0.drops["bufferTooSmall", default: 0] >= 1 }).drops["bufferTooSmall"], 1)
        XCTAssertEqual(g.usedIndex(0), 1)
    }

    /// A frame longer than the largest frame (the tap's MTU set to 16000, a guest without
    /// segmentation offloads) is cut by the kernel to the window: it must be dropped as
    /// frameTooLarge, never delivered cut, and the ring goes on (docs/SOFTNIC.md, "Zero-copy tap":
    /// the cut bytes stay in the posted buffers until later frames are written over them).
    func testZeroCopyRXDropsAFrameLongerThanTheLargestFrame() throws {
        let (env, name) = try tapPort()
        let g = try env.connectAndStart("t")
        let sock = try PacketSocket(interface: name)
        let mtu = Process()
        mtu.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        mtu.arguments = ["link", "set", "dev", name, "mtu", "16000"]
        try mtu.run(); mtu.waitUntilExit()
        var gpas: [UInt64] = []
        for _ in 0..<20 {                 // 10240 bytes >= 12 + 9018: zero-copy window
            let gpa = g.alloc(512)
            g.host(gpa, 512).initializeMemory(as: UInt8.self, repeating: 0xEE, count: 512)
            g.add([DriverBuffer(gpa: gpa, length: 512, isWritable: true)], ring: 0)
            gpas.append(gpa)
        }
        g.ring(0).publish()
        g.kick(0)
        sock.send(tapFrame(12000, seed: 3))
        XCTAssertEqual(stats(env, "t", 0, until: { $0.drops["frameTooLarge", default: 0] == 1 }).drops["frameTooLarge"], 1)
        XCTAssertEqual(g.usedIndex(0), 0, "nothing used")
        let next = tapFrame(1000, seed: 4)
        sock.send(next)
        XCTAssertEqual(g.receive(1).map(\.frame), [next], "the next frame lands whole in the same buffers")
    }

    /// Finding: a frame that can never fit the peer's buffers (here one "segment" of a TSO frame
    /// whose gso_size the sender chose as large as its payload; equally a 9000-byte plain frame)
    /// is retried forever at the head of the wire: every later frame from the peer is stuck.
    func testWireFrameThatCanNeverFitDoesNotBlockTheWire() throws {
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let a = "ra\(tag)", b = "rb\(tag)"
        let env = try makeDaemon([.init(id: a, link: "wire:\(b)"), .init(id: b, link: "wire:\(a)")])
        let ga = try env.connectAndStart(a, features: Features.all | VirtioNetFeature.offloads)
        // B: no MRG_RXBUF, no GUEST_* offloads, 2 KiB buffers (a legitimate MTU-1500 guest).
        let gb = try env.connectAndStart(b, features: Features.base | Features.eventIdx | Features.indirect)
        gb.postRX(count: 16, size: 2048)
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(6000, seed: 5))
        let next = TestFrames.make(length: 300, seed: 7)
        ga.sendAndComplete([p.bytes, next], headers: [netHeaderBytes(p.header(gsoSize: 6000)), netHeaderBytes(VirtioNetHeader())])
        let got = gb.receive(1, timeout: 2)
        XCTAssertEqual(got.map(\.frame), [next], "the frame after the one that cannot fit arrives")
        XCTAssertEqual(env.queue(b, 0).drops["bufferTooSmall"], 1, "the frame that cannot fit is dropped once, counted")
    }

    /// Finding: DATA_VALID set by the sending guest on TX (which the device must ignore) is
    /// handed to the receiving guest as "checksum validated" over the wire, though nothing
    /// validated it (the frame's TCP checksum here is wrong).
    func testWireDoesNotForwardTheSendersDataValid() throws {
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let a = "va\(tag)", b = "vb\(tag)"
        let env = try makeDaemon([.init(id: a, link: "wire:\(b)"), .init(id: b, link: "wire:\(a)")])
        let ga = try env.connectAndStart(a, features: Features.all)           // not even CSUM
        let gb = try env.connectAndStart(b, features: Features.all | VirtioNetFeature.offloads)
        gb.postRX(count: 4, size: 4096)
        var p = OffloadPacket.make(payload: OffloadPacket.bytes(500, seed: 9))
        p.bytes[p.l4 + 16] ^= 0xFF   // break the TCP checksum
        ga.sendAndComplete([p.bytes], headers: [netHeaderBytes(VirtioNetHeader(flags: VirtioNetHeader.flagDataValid))])
        let got = gb.receive(1)
        XCTAssertEqual(got.first.map { $0.header[0] }, 0, "B is told DATA_VALID for a frame with a bad checksum")
    }

    func testTwoPortsWiredToOnePeerAreRefused() throws {
        let tag = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        XCTAssertThrowsError(try makeDaemon([.init(id: "xa\(tag)", link: "wire:xc\(tag)"), .init(id: "xb\(tag)", link: "wire:xc\(tag)"),
                                             .init(id: "xc\(tag)", link: "wire:xa\(tag)")])) { error in
            XCTAssertTrue("\(error)".contains("already wired to xc\(tag)"), "\(error)")
        }
    }
}
