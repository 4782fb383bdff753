import XCTest
@testable import Virtio

final class VirtioNetHeaderTests: XCTestCase {
    func testSizeDependsOnVersion1OrMergeableBuffers() {
        XCTAssertEqual(VirtioNetHeader.size(features: 0), 10)
        XCTAssertEqual(VirtioNetHeader.size(features: VirtioNetFeature.csum), 10)
        XCTAssertEqual(VirtioNetHeader.size(features: VirtioFeature.version1), 12)
        XCTAssertEqual(VirtioNetHeader.size(features: VirtioNetFeature.mrgRxbuf), 12)
    }

    func testTwelveByteLayoutAndRoundTrip() {
        let h = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsCsum, gsoType: VirtioNetHeader.gsoTCPv4,
                                hdrLen: 0x0102, gsoSize: 0x0304, csumStart: 0x0506, csumOffset: 0x0708, numBuffers: 0x090A)
        var bytes = [UInt8](repeating: 0xEE, count: 14)
        bytes.withUnsafeMutableBytes { h.write(to: $0.baseAddress! + 1, size: 12) }
        XCTAssertEqual(bytes, [0xEE, 1, 1, 2, 1, 4, 3, 6, 5, 8, 7, 0x0A, 0x09, 0xEE])
        let back = bytes.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress! + 1, size: 12) }
        XCTAssertEqual(back, h)
    }

    func testTenByteFormHasNoNumBuffers() {
        let h = VirtioNetHeader(flags: VirtioNetHeader.flagDataValid, hdrLen: 54, numBuffers: 3)
        var bytes = [UInt8](repeating: 0xEE, count: 12)
        bytes.withUnsafeMutableBytes { h.write(to: $0.baseAddress!, size: 10) }
        XCTAssertEqual(bytes[10...], [0xEE, 0xEE])
        let back = bytes.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress!, size: 10) }
        XCTAssertEqual(back.numBuffers, 0)
        XCTAssertEqual(back.hdrLen, 54)
        XCTAssertEqual(back.flags, VirtioNetHeader.flagDataValid)
    }
}
