import XCTest
@testable import Virtio

/// Guest memory for walker tests: one real flat region (tables live there), plus a large
/// pretend region above it whose ranges "map" to a dummy pointer, so chains of gigabytes can
/// be validated without allocating them. The walker never dereferences buffer pointers.
struct SparseMemory: GuestMemoryAccess {
    let flat: FlatGuestMemory
    let pretendStart: UInt64
    let pretendSize: UInt64

    func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        if let p = flat.hostPointer(gpa: gpa, length: length) { return p }
        guard GuestRange.offset(gpa: gpa, length: length, regionStart: pretendStart, regionSize: pretendSize) != nil
        else { return nil }
        return flat.base
    }
}

/// A descriptor table in flat guest memory plus a walker, for hostile-input tests.
final class ChainFixture {
    static let baseGPA: UInt64 = 0x1_0000
    static let tableGPA: UInt64 = 0x1_0000
    static let indirectGPA: UInt64 = 0x1_2000
    static let dataGPA: UInt64 = 0x1_4000

    let memory = FlatGuestMemory(size: 0x1_0000, baseGPA: ChainFixture.baseGPA)
    let queueSize: UInt16
    var walker: DescriptorChainWalker

    init(queueSize: UInt16 = 8, indirectAllowed: Bool = true) {
        self.queueSize = queueSize
        walker = DescriptorChainWalker(capacity: queueSize, indirectAllowed: indirectAllowed)
    }

    var table: UnsafeMutableRawPointer { memory.pointer(gpa: Self.tableGPA, length: UInt64(queueSize) * 16) }

    /// Writes `d` as entry `index` of the ring's descriptor table.
    func set(_ index: UInt16, _ d: VirtqDescriptor) {
        d.store(to: table + Int(index) * 16)
    }

    /// Writes `entries` as an indirect table at `gpa`.
    func setIndirect(_ entries: [VirtqDescriptor], at gpa: UInt64 = ChainFixture.indirectGPA) {
        let p = memory.pointer(gpa: gpa, length: UInt64(entries.count) * 16)
        for (i, d) in entries.enumerated() { d.store(to: p + i * 16) }
    }

    /// A data buffer gpa: 256 bytes per slot.
    static func data(_ slot: Int) -> UInt64 { dataGPA + UInt64(slot) * 256 }

    func walk(head: UInt16 = 0) throws(ChainError) -> DescriptorChain {
        try walker.walk(head: head, table: table, queueSize: queueSize, memory: memory)
    }

    func walk<M: GuestMemoryAccess>(head: UInt16 = 0, memory other: M) throws(ChainError) -> DescriptorChain {
        try walker.walk(head: head, table: table, queueSize: queueSize, memory: other)
    }
}

func assertRejects(_ expected: ChainError, file: StaticString = #filePath, line: UInt = #line,
                   _ body: () throws -> DescriptorChain) {
    do {
        let chain = try body()
        XCTFail("chain accepted (\(chain.count) segments), expected \(expected)", file: file, line: line)
    } catch let error as ChainError {
        XCTAssertEqual(error, expected, file: file, line: line)
    } catch {
        XCTFail("unexpected error \(error)", file: file, line: line)
    }
}
