import XCTest
@testable import Virtio

final class DescriptorChainWalkerTests: XCTestCase {
    typealias D = VirtqDescriptor
    typealias F = ChainFixture

    // MARK: accepted chains

    func testValidDirectChain() throws {
        let f = F()
        f.set(2, D(addr: F.data(0), len: 14, flags: .next, next: 5))
        f.set(5, D(addr: F.data(1), len: 100, flags: .next, next: 1))
        f.set(1, D(addr: F.data(2), len: 256, flags: .write))
        let chain = try f.walk(head: 2)
        XCTAssertEqual(chain.head, 2)
        XCTAssertEqual(chain.count, 3)
        XCTAssertEqual(chain.readableBytes, 114)
        XCTAssertEqual(chain.writableBytes, 256)
        XCTAssertEqual(chain.totalBytes, 370)
        XCTAssertEqual(chain.firstWritableIndex, 2)
        XCTAssertFalse(chain.usedIndirectTable)
        XCTAssertEqual(chain.map(\.gpa), [F.data(0), F.data(1), F.data(2)])
        XCTAssertEqual(chain.map(\.length), [14, 100, 256])
        XCTAssertEqual(chain.map(\.isWritable), [false, false, true])
        XCTAssertEqual(chain.map(\.host), [F.data(0), F.data(1), F.data(2)].map { f.memory.pointer(gpa: $0) })
        XCTAssertEqual(chain[chain.firstWritableIndex...].map(\.length), [256])
    }

    func testValidIndirectChain() throws {
        let f = F()
        f.setIndirect([
            D(addr: F.data(0), len: 12, flags: .next, next: 1),
            D(addr: F.data(1), len: 200, flags: [.next, .write], next: 2),
            D(addr: F.data(2), len: 56, flags: .write),
        ])
        f.set(3, D(addr: F.indirectGPA, len: 48, flags: .indirect))
        let chain = try f.walk(head: 3)
        XCTAssertTrue(chain.usedIndirectTable)
        XCTAssertEqual(chain.map(\.gpa), [F.data(0), F.data(1), F.data(2)])
        XCTAssertEqual(chain.readableBytes, 12)
        XCTAssertEqual(chain.writableBytes, 256)
        XCTAssertEqual(chain.firstWritableIndex, 1)
    }

    func testDirectDescriptorsBeforeAnIndirectTable() throws {
        let f = F()
        f.setIndirect([D(addr: F.data(1), len: 64, flags: .write)])
        f.set(0, D(addr: F.data(0), len: 10, flags: .next, next: 1))
        f.set(1, D(addr: F.indirectGPA, len: 16, flags: .indirect))
        let chain = try f.walk()
        XCTAssertEqual(chain.map(\.isWritable), [false, true])
    }

    func testChainAsLongAsTheQueueIsAccepted() throws {
        let f = F(queueSize: 8)
        for i: UInt16 in 0..<8 {
            f.set(i, D(addr: F.data(Int(i)), len: 1, flags: i < 7 ? .next : [], next: i + 1))
        }
        XCTAssertEqual(try f.walk().count, 8)
        // The same, through an indirect table of exactly queue-size entries.
        f.setIndirect((0..<8).map { i in D(addr: F.data(i), len: 1, flags: i < 7 ? .next : [], next: UInt16(i + 1)) })
        f.set(0, D(addr: F.indirectGPA, len: 8 * 16, flags: .indirect))
        XCTAssertEqual(try f.walk().count, 8)
    }

    func testZeroLengthBufferAndNoWritableSegments() throws {
        let f = F()
        f.set(0, D(addr: F.data(0), len: 0))
        let chain = try f.walk()
        XCTAssertEqual(chain.count, 1)
        XCTAssertEqual(chain.firstWritableIndex, 1)
        XCTAssertEqual(chain.totalBytes, 0)
    }

    func testWalkerIsReusedWithoutReallocating() throws {
        let f = F()
        f.set(0, D(addr: F.data(0), len: 1, flags: .write))
        f.set(1, D(addr: F.data(1), len: 2))
        let first = try f.walk(head: 0)
        let segmentAddress = first.segments.baseAddress
        let second = try f.walk(head: 1)
        XCTAssertEqual(second.segments.baseAddress, segmentAddress)
        XCTAssertEqual(second.map(\.length), [2])
    }

    func testMaximumTotalLengthIsAccepted() throws {
        let f = F()
        let memory = SparseMemory(flat: f.memory, pretendStart: 1 << 40, pretendSize: 1 << 34)
        f.set(0, D(addr: 1 << 40, len: 0x8000_0000, flags: .next, next: 1))
        f.set(1, D(addr: (1 << 40) + 0x8000_0000, len: 0x7FFF_FFFF, flags: .write))
        XCTAssertEqual(try f.walk(memory: memory).totalBytes, 0xFFFF_FFFF)
    }

    // MARK: rejected chains, one per check

    func testRejectsQueueSizeAboveCapacity() {
        let f = F(queueSize: 8)
        assertRejects(.invalidQueueSize(16)) {
            try f.walker.walk(head: 0, table: f.table, queueSize: 16, memory: f.memory)
        }
        assertRejects(.invalidQueueSize(0)) {
            try f.walker.walk(head: 0, table: f.table, queueSize: 0, memory: f.memory)
        }
    }

    func testRejectsHeadOutOfRange() {
        let f = F(queueSize: 8)
        f.set(7, D(addr: F.data(0), len: 1))
        XCTAssertNoThrow(try f.walk(head: 7))
        assertRejects(.headOutOfRange(head: 8, queueSize: 8)) { try f.walk(head: 8) }
        assertRejects(.headOutOfRange(head: 0xFFFF, queueSize: 8)) { try f.walk(head: 0xFFFF) }
    }

    func testRejectsNextOutOfRange() {
        let f = F(queueSize: 8)
        f.set(0, D(addr: F.data(0), len: 1, flags: .next, next: 8))
        assertRejects(.nextOutOfRange(next: 8, tableSize: 8)) { try f.walk() }
    }

    func testRejectsNextOutOfRangeInIndirectTable() {
        let f = F()
        f.setIndirect([D(addr: F.data(0), len: 1, flags: .next, next: 1),
                       D(addr: F.data(1), len: 1, flags: .next, next: 2)])
        f.set(0, D(addr: F.indirectGPA, len: 32, flags: .indirect))
        assertRejects(.nextOutOfRange(next: 2, tableSize: 2)) { try f.walk() }
    }

    func testRejectsLoop() {
        let f = F(queueSize: 8)
        f.set(0, D(addr: F.data(0), len: 1, flags: .next, next: 1))
        f.set(1, D(addr: F.data(1), len: 1, flags: .next, next: 2))
        f.set(2, D(addr: F.data(2), len: 1, flags: .next, next: 0))
        // 0, 1, 2, 0, 1, 2, 0, 1 are the 8 allowed visits; the 9th (descriptor 2) trips the TTL.
        assertRejects(.loop(index: 2, ttl: 8)) { try f.walk() }
    }

    func testRejectsSelfLoop() {
        let f = F(queueSize: 4)
        f.set(3, D(addr: F.data(0), len: 1, flags: .next, next: 3))
        assertRejects(.loop(index: 3, ttl: 4)) { try f.walk(head: 3) }
    }

    func testRejectsLoopInIndirectTable() {
        // TTL is the table's entry count (3), below the queue size (8).
        let f = F(queueSize: 8)
        f.setIndirect([D(addr: F.data(0), len: 1, flags: .next, next: 1),
                       D(addr: F.data(1), len: 1, flags: .next, next: 0),
                       D(addr: F.data(2), len: 1)])
        f.set(0, D(addr: F.indirectGPA, len: 48, flags: .indirect))
        assertRejects(.loop(index: 1, ttl: 3)) { try f.walk() }
    }

    func testRejectsChainLongerThanTheQueue() {
        // An indirect table of 9 chained entries in a queue of 8: no loop, but too long.
        let f = F(queueSize: 8)
        f.setIndirect((0..<9).map { i in D(addr: F.data(i), len: 1, flags: i < 8 ? .next : [], next: UInt16(i + 1)) })
        f.set(0, D(addr: F.indirectGPA, len: 9 * 16, flags: .indirect))
        assertRejects(.chainTooLong(limit: 8)) { try f.walk() }
    }

    func testRejectsNestedIndirect() {
        let f = F()
        f.setIndirect([D(addr: F.data(0), len: 1, flags: .next, next: 1),
                       D(addr: F.indirectGPA, len: 32, flags: .indirect)])
        f.set(0, D(addr: F.indirectGPA, len: 32, flags: .indirect))
        assertRejects(.nestedIndirect(index: 1)) { try f.walk() }
    }

    func testRejectsIndirectWithNext() {
        let f = F()
        f.setIndirect([D(addr: F.data(0), len: 1)])
        f.set(4, D(addr: F.indirectGPA, len: 16, flags: [.indirect, .next], next: 5))
        f.set(5, D(addr: F.data(1), len: 1))
        assertRejects(.indirectWithNext(index: 4)) { try f.walk(head: 4) }
    }

    func testRejectsIndirectTableOfLengthZero() {
        let f = F()
        f.set(0, D(addr: F.indirectGPA, len: 0, flags: .indirect))
        assertRejects(.indirectTableLength(0)) { try f.walk() }
    }

    func testRejectsIndirectTableLengthNotMultipleOf16() {
        let f = F()
        f.setIndirect([D(addr: F.data(0), len: 1), D(addr: F.data(1), len: 1)])
        f.set(0, D(addr: F.indirectGPA, len: 24, flags: .indirect))
        assertRejects(.indirectTableLength(24)) { try f.walk() }
    }

    func testRejectsIndirectWhenNotNegotiated() {
        let f = F(indirectAllowed: false)
        f.setIndirect([D(addr: F.data(0), len: 1)])
        f.set(0, D(addr: F.indirectGPA, len: 16, flags: .indirect))
        assertRejects(.indirectNotNegotiated(index: 0)) { try f.walk() }
    }

    func testRejectsTotalLengthOver4GiB() {
        let f = F()
        let memory = SparseMemory(flat: f.memory, pretendStart: 1 << 40, pretendSize: 1 << 34)
        f.set(0, D(addr: 1 << 40, len: 0x8000_0000, flags: .next, next: 1))
        f.set(1, D(addr: (1 << 40) + 0x8000_0000, len: 0x8000_0000, flags: .write))
        assertRejects(.totalLengthOverflow(0x1_0000_0000)) { try f.walk(memory: memory) }
    }

    func testRejectsBufferOutsideGuestMemory() {
        let f = F()
        let end = ChainFixture.baseGPA + UInt64(f.memory.size)
        f.set(0, D(addr: end - 16, len: 17))
        assertRejects(.bufferOutOfRange(gpa: end - 16, length: 17)) { try f.walk() }
        f.set(0, D(addr: 0x100, len: 1)) // below the region
        assertRejects(.bufferOutOfRange(gpa: 0x100, length: 1)) { try f.walk() }
        f.set(0, D(addr: UInt64.max - 3, len: 8)) // wraps around 2^64
        assertRejects(.bufferOutOfRange(gpa: UInt64.max - 3, length: 8)) { try f.walk() }
    }

    func testRejectsIndirectTableOutsideGuestMemory() {
        let f = F()
        let end = ChainFixture.baseGPA + UInt64(f.memory.size)
        f.set(0, D(addr: end - 16, len: 32, flags: .indirect))
        assertRejects(.indirectTableOutOfRange(gpa: end - 16, length: 32)) { try f.walk() }
        f.set(0, D(addr: UInt64.max - 15, len: 32, flags: .indirect))
        assertRejects(.indirectTableOutOfRange(gpa: UInt64.max - 15, length: 32)) { try f.walk() }
    }

    func testRejectsReadableAfterWritable() {
        let f = F()
        f.set(0, D(addr: F.data(0), len: 1, flags: [.write, .next], next: 1))
        f.set(1, D(addr: F.data(1), len: 1))
        assertRejects(.readableAfterWritable(index: 1)) { try f.walk() }
    }

    func testRejectsReadableAfterWritableAcrossAnIndirectTable() {
        let f = F()
        f.setIndirect([D(addr: F.data(1), len: 1)])
        f.set(0, D(addr: F.data(0), len: 1, flags: [.write, .next], next: 1))
        f.set(1, D(addr: F.indirectGPA, len: 16, flags: .indirect))
        assertRejects(.readableAfterWritable(index: 0)) { try f.walk() }
    }

    // MARK: errors explain themselves

    func testDescriptionsNameTheField() {
        let cases: [(ChainError, String)] = [
            (.headOutOfRange(head: 9, queueSize: 8), "head 9"),
            (.nextOutOfRange(next: 9, tableSize: 8), "next = 9"),
            (.loop(index: 1, ttl: 8), "loop"),
            (.chainTooLong(limit: 8), "more than 8"),
            (.nestedIndirect(index: 2), "INDIRECT"),
            (.indirectWithNext(index: 2), "INDIRECT and NEXT"),
            (.indirectTableLength(24), "len = 24"),
            (.indirectNotNegotiated(index: 0), "INDIRECT_DESC"),
            (.totalLengthOverflow(0x1_0000_0000), "len sums to 4294967296"),
            (.bufferOutOfRange(gpa: 0x10, length: 3), "addr = 0x10, len = 3"),
            (.indirectTableOutOfRange(gpa: 0x10, length: 32), "addr = 0x10, len = 32"),
            (.readableAfterWritable(index: 1), "WRITE"),
        ]
        for (error, fragment) in cases {
            XCTAssertTrue(error.description.contains(fragment), "\(error.description) lacks \(fragment)")
        }
    }
}
