import Foundation
import Glibc
import XCTest
import Virtio
@testable import SoftNIC

/// What the offload and tap tests share.
extension SoftNICTestCase {
    /// A virtio-net header as the 12 bytes a guest writes in front of a TX frame.
    func netHeaderBytes(_ h: VirtioNetHeader) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: netHeaderLength)
        b.withUnsafeMutableBytes { h.write(to: $0.baseAddress!, size: netHeaderLength) }
        return b
    }

    /// A daemon with one port "t" on a fresh TAP interface (root and /dev/net/tun, else skipped).
    func tapPort(_ options: String = "") throws -> (SoftNICTestDaemon, String) {
        guard getuid() == 0, access("/dev/net/tun", R_OK | W_OK) == 0 else { throw XCTSkip("needs root and /dev/net/tun") }
        let name = "vdt\(UInt32.random(in: 0...0xFFFFFF))"
        return (try makeDaemon([.init(id: "t", link: "tap:ifname=\(name)" + options)]), name)
    }

    /// A test frame with ethertype 0x88B6, which the host's stack leaves alone on a TAP.
    func tapFrame(_ length: Int, seed: Int) -> [UInt8] {
        var f = TestFrames.make(length: length, seed: seed)
        f[12] = 0x88
        f[13] = 0xB6
        return f
    }
}
