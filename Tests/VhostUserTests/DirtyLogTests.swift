import XCTest
@testable import VhostUser

final class DirtyLogTests: XCTestCase {
    /// A log of `bytes` bytes over test-owned memory.
    func withLog(bytes: Int, _ body: (DirtyLog) -> Void) {
        let mem = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 8), alignment: 8)
        mem.initializeMemory(as: UInt8.self, repeating: 0, count: max(bytes, 8))
        defer { mem.deallocate() }
        body(DirtyLog(unownedBase: mem, byteCount: bytes))
    }

    func marked(_ log: DirtyLog) -> [UInt64] { (0..<log.pageCount).filter { log.isMarked(page: $0) } }

    func testMarksExactlyThePagesOfARange() {
        withLog(bytes: 64) { log in
            log.mark(gpa: 0x1000, length: 1)
            XCTAssertEqual(marked(log), [1])
            log.mark(gpa: 0x2fff, length: 2)  // last byte of page 2 and first of page 3
            XCTAssertEqual(marked(log), [1, 2, 3])
            log.mark(gpa: 0x5000, length: 0x1000)  // exactly one page
            XCTAssertEqual(marked(log), [1, 2, 3, 5])
            log.mark(gpa: 0x7000, length: 0)
            XCTAssertEqual(marked(log), [1, 2, 3, 5], "zero length marks nothing")
        }
    }

    func testRangesAcrossWordBoundaries() {
        withLog(bytes: 64) { log in
            log.mark(gpa: 62 * 4096 + 100, length: 4 * 4096)  // pages 62...66 cross the first 64-page word
            XCTAssertEqual(marked(log), [62, 63, 64, 65, 66])
            log.mark(gpa: 100 * 4096, length: 200 * 4096)  // pages 100...299: five words
            XCTAssertEqual(marked(log).count, 5 + 200)
            XCTAssertTrue(log.isMarked(page: 299))
            XCTAssertFalse(log.isMarked(page: 300))
            XCTAssertFalse(log.isMarked(page: 99))
        }
    }

    func testBitLayoutMatchesQEMU() {
        withLog(bytes: 16) { log in
            log.mark(gpa: 9 * 4096, length: 1)
            // Page 9: byte 1, bit 1.
            XCTAssertEqual(log.base.load(fromByteOffset: 1, as: UInt8.self), 0b10)
            XCTAssertEqual(log.base.load(fromByteOffset: 0, as: UInt8.self), 0)
        }
    }

    func testOutOfRangeWritesAreCounted() {
        withLog(bytes: 8) { log in  // 64 pages
            log.mark(gpa: 63 * 4096, length: 3 * 4096)  // pages 63, 64, 65: two beyond
            XCTAssertTrue(log.isMarked(page: 63))
            XCTAssertEqual(log.outOfRangeMarks, 2)
            log.mark(gpa: 1 << 40, length: 1)
            XCTAssertEqual(log.outOfRangeMarks, 3)
        }
    }

    func testLogWhoseSizeIsNotAWholeWord() {
        withLog(bytes: 12) { log in  // 96 pages; the second word is half inside
            log.mark(gpa: 90 * 4096, length: 10 * 4096)  // pages 90...99
            XCTAssertEqual(marked(log), Array(90...95))
            XCTAssertEqual(log.outOfRangeMarks, 4)
        }
    }

    func testBatchDoesOneORPerWord() {
        withLog(bytes: 64) { log in
            var batch = DirtyLog.Batch(log: log)
            for page in stride(from: UInt64(0), to: 64, by: 2) { batch.mark(gpa: page * 4096, length: 16) }
            batch.mark(gpa: 64 * 4096, length: 1)
            batch.flush()
            XCTAssertEqual(log.wordsTouched, 2, "32 ranges in word 0 and one in word 1: two ORs")
            XCTAssertEqual(marked(log).count, 33)
        }
    }

    func testHugeLengthDoesNotOverflow() {
        withLog(bytes: 8) { log in
            log.mark(gpa: UInt64.max - 10, length: 100)
            XCTAssertGreaterThan(log.outOfRangeMarks, 0)
        }
    }

    func testBytesNeeded() {
        XCTAssertEqual(DirtyLog.bytesNeeded(guestPhysEnd: 0), 0)
        XCTAssertEqual(DirtyLog.bytesNeeded(guestPhysEnd: 1), 1)
        XCTAssertEqual(DirtyLog.bytesNeeded(guestPhysEnd: 256 << 20), 8192)
    }
}
