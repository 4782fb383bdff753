import XCTest
import Virtio
@testable import SoftNIC

/// The wire's ring of frames with their headers: records of every size wrap around the storage
/// intact, and the ring refuses a frame when either its bytes or its frame count are used up.
final class FrameRingTests: XCTestCase {
    func testRecordsOfEverySizeWrapAroundIntactWithTheirHeaders() throws {
        let ring = try FrameRing(capacity: 1 << 19)
        var pending: [([UInt8], VirtioNetHeader)] = []
        var sizes = [0, 1, 15, 16, 17, 60, 1514, 9018, 40_000, FrameRing.maxFrame]
        sizes += (0..<60).map { ($0 * 7919) % 70_000 % (FrameRing.maxFrame + 1) }
        let pattern = (0..<(2 * FrameRing.maxFrame)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) }
        for round in 0..<4 {
            for (i, n) in sizes.enumerated() {
                let at = (i * 977 + round * 13) % FrameRing.maxFrame
                let f = Array(pattern[at..<(at + n)])
                let h = VirtioNetHeader(flags: UInt8(i & 3), gsoType: UInt8(round), hdrLen: UInt16(n & 0xFFFF), gsoSize: UInt16(i),
                                        csumStart: 14, csumOffset: 16)
                // Push while it fits; pop the oldest when full.
                while !f.withUnsafeBytes({ ring.push($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, length: n, header: h) }) {
                    let (expected, eh) = pending.removeFirst()
                    try check(ring, expected, eh)
                }
                pending.append((f, h))
            }
        }
        for (f, h) in pending { try check(ring, f, h) }
        XCTAssertNil(ring.peek())
        XCTAssertTrue(ring.isEmpty)
    }

    func check(_ ring: FrameRing, _ f: [UInt8], _ h: VirtioNetHeader, file: StaticString = #filePath, line: UInt = #line) throws {
        let (p, len, hp) = try XCTUnwrap(ring.peek(), file: file, line: line)
        XCTAssertEqual(len, f.count, file: file, line: line)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: p, count: len)), f, file: file, line: line)
        XCTAssertEqual(VirtioNetHeader(from: hp, size: VirtioNetHeader.fullSize), h, file: file, line: line)
        ring.pop()
    }

    func testFullByFramesOrByBytes() throws {
        let ring = try FrameRing(capacity: 1 << 19)
        let small = [UInt8](repeating: 7, count: 60)
        var n = 0
        while small.withUnsafeBytes({ ring.push($0.baseAddress!, length: 60, header: VirtioNetHeader()) }) { n += 1 }
        XCTAssertEqual(n, FrameRing.maxFrames, "at most 4096 frames wait, however small")
        let ring2 = try FrameRing(capacity: 1 << 19)
        let big = [UInt8](repeating: 9, count: FrameRing.maxFrame)
        var m = 0
        while big.withUnsafeBytes({ ring2.push($0.baseAddress!, length: big.count, header: VirtioNetHeader()) }) { m += 1 }
        XCTAssertEqual(m, (1 << 19) / FrameRing.recordSize(FrameRing.maxFrame), "large frames fill the bytes first")
        XCTAssertFalse(big.withUnsafeBytes { ring2.push($0.baseAddress!, length: FrameRing.maxFrame + 1, header: VirtioNetHeader()) })
    }
}
