import XCTest
@testable import Virtio

final class SplitRingLayoutTests: XCTestCase {
    func testSizesFollowTheSpec() throws {
        for n: UInt16 in [1, 2, 256, 1024, 32768] {
            let l = try XCTUnwrap(SplitRingLayout(queueSize: n))
            XCTAssertEqual(l.descriptorTableBytes, 16 * Int(n))
            XCTAssertEqual(l.availRingBytes, 6 + 2 * Int(n))
            XCTAssertEqual(l.usedRingBytes, 6 + 8 * Int(n))
            XCTAssertEqual(l.usedEventOffset, 4 + 2 * Int(n))
            XCTAssertEqual(l.availEventOffset, 4 + 8 * Int(n))
        }
        let l256 = try XCTUnwrap(SplitRingLayout(queueSize: 256))
        XCTAssertEqual(l256.descriptorTableBytes, 4096)
        XCTAssertEqual(l256.availRingBytes, 518)
        XCTAssertEqual(l256.usedRingBytes, 2054)
    }

    func testAlignmentsAndLimits() {
        XCTAssertEqual(SplitRingLayout.descriptorTableAlignment, 16)
        XCTAssertEqual(SplitRingLayout.availAlignment, 2)
        XCTAssertEqual(SplitRingLayout.usedAlignment, 4)
        XCTAssertEqual(SplitRingLayout.maxQueueSize, 32768)
    }

    func testQueueSizeMustBeAPowerOfTwoUpTo32768() {
        for n: UInt16 in [0, 3, 6, 100, 32767, 32769, 49152, 65535] {
            XCTAssertFalse(SplitRingLayout.isValidQueueSize(n), "\(n)")
            XCTAssertNil(SplitRingLayout(queueSize: n), "\(n)")
        }
        for shift in 0...15 {
            XCTAssertTrue(SplitRingLayout.isValidQueueSize(UInt16(1) << UInt16(shift)))
        }
        XCTAssertFalse(SplitRingLayout.isPowerOfTwo(0))
        XCTAssertTrue(SplitRingLayout.isPowerOfTwo(1 << 31))
        XCTAssertFalse(SplitRingLayout.isPowerOfTwo(UInt32.max))
    }

    func testContiguousOffsetsAreAligned() throws {
        let l = try XCTUnwrap(SplitRingLayout(queueSize: 1))
        let o = l.contiguousOffsets()
        XCTAssertEqual(o.descriptorTable, 0)
        XCTAssertEqual(o.avail, 16)
        XCTAssertEqual(o.used, 24) // 16 + 8 rounded up to 4
        XCTAssertEqual(o.totalBytes, 24 + 14)
        let legacy = l.contiguousOffsets(usedAlignment: 4096)
        XCTAssertEqual(legacy.used, 4096)
    }

    func testRingFormatFromFeatures() {
        XCTAssertEqual(RingFormat(negotiatedFeatures: VirtioFeature.version1), .split)
        XCTAssertEqual(RingFormat(negotiatedFeatures: VirtioFeature.version1 | VirtioFeature.ringPacked), .packed)
    }

    func testGuestRangeIsOverflowSafe() {
        XCTAssertEqual(GuestRange.offset(gpa: 0x1000, length: 0x1000, regionStart: 0x1000, regionSize: 0x1000), 0)
        XCTAssertNil(GuestRange.offset(gpa: 0x1000, length: 0x1001, regionStart: 0x1000, regionSize: 0x1000))
        XCTAssertNil(GuestRange.offset(gpa: 0xFFF, length: 1, regionStart: 0x1000, regionSize: 0x1000))
        XCTAssertEqual(GuestRange.offset(gpa: 0x2000, length: 0, regionStart: 0x1000, regionSize: 0x1000), 0x1000)
        XCTAssertNil(GuestRange.offset(gpa: 0x2001, length: 0, regionStart: 0x1000, regionSize: 0x1000))
        XCTAssertNil(GuestRange.offset(gpa: UInt64.max, length: 2, regionStart: 0, regionSize: UInt64.max))
        XCTAssertNil(GuestRange.offset(gpa: 0x1800, length: UInt64.max, regionStart: 0x1000, regionSize: 0x1000))
        let mem = FlatGuestMemory(size: 64, baseGPA: UInt64.max - 63)
        XCTAssertNotNil(mem.hostPointer(gpa: UInt64.max - 63, length: 64))
        XCTAssertNil(mem.hostPointer(gpa: UInt64.max - 1, length: 3))
        XCTAssertEqual(mem.hostPointer(gpa: UInt64.max - 31, length: 1), mem.base + 32)
    }
}
