@testable import SoftNIC
import Virtio
import XCTest

/// The RX writer over plain memory, without an engine thread: a driver-side ring
/// (`DriverSplitRing`) posts buffers in a `FlatGuestMemory`, the writer writes frames into them,
/// the test publishes the used index the way the engine's `flush` would and reads it back.
final class RXWriterTests: XCTestCase {
    static let ringSize: UInt16 = 8
    static let bufferBase: UInt64 = 0x1_0000
    /// What a buffer holds before the device writes it: a write shows as a changed byte.
    static let untouched: UInt8 = 0xA5

    let memory = FlatGuestMemory(size: 1 << 20)
    var ring: DriverSplitRing!
    var walker = DescriptorChainWalker(capacity: RXWriterTests.ringSize, indirectAllowed: true)
    var position = RXPosition(lastAvail: 0, usedIdx: 0, availCache: 0)
    var nextBuffer = RXWriterTests.bufferBase

    override func setUpWithError() throws {
        ring = try DriverSplitRing(size: Self.ringSize, eventIdx: false, baseGPA: 0, memory: memory)
        memory.pointer(gpa: Self.bufferBase, length: 0x8_0000).initializeMemory(as: UInt8.self, repeating: Self.untouched, count: 0x8_0000)
    }

    /// Posts one chain of writable buffers of the given lengths (each at its own 4 KiB slot);
    /// returns the head and the buffers' addresses.
    @discardableResult
    func post(_ lengths: [UInt32]) -> (head: UInt16, gpas: [UInt64]) {
        var gpas: [UInt64] = []
        for _ in lengths {
            gpas.append(nextBuffer)
            nextBuffer += 0x1000
        }
        let head = ring.addChain(zip(gpas, lengths).map { DriverBuffer(gpa: $0, length: $1, isWritable: true) })!
        ring.publish()
        return (head, gpas)
    }

    func write(_ frame: [UInt8], header: Int = 12, mergeable: Bool = false) throws(RXFault) -> RXOutcome {
        let writer = RXWriter(queue: ring.deviceQueue(), memory: memory, headerLength: header, mergeable: mergeable)
        let result = frame.withUnsafeBytes { raw in
            Result { () throws(RXFault) in try writer.write(raw.baseAddress!, length: frame.count, walker: &walker, at: &position) }
        }
        return try result.get()
    }

    /// The fault `write` reported (nil, and a test failure, when it did not fault).
    func fault(_ frame: [UInt8], mergeable: Bool = false, file: StaticString = #filePath, line: UInt = #line) -> String? {
        do throws(RXFault) {
            let outcome = try write(frame, mergeable: mergeable)
            XCTFail("expected a fault, got \(outcome)", file: file, line: line)
            return nil
        } catch {
            return error.text
        }
    }

    /// Publishes what the writer wrote (as the engine's flush does) and returns the used entries.
    func publishAndPop() throws -> [UsedElement] {
        ring.deviceQueue().publishUsedIndex(position.usedIdx)
        var out: [UsedElement] = []
        while let e = try ring.popUsed() { out.append(e) }
        return out
    }

    func bytes(_ gpa: UInt64, _ count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: memory.pointer(gpa: gpa, length: UInt64(count)), count: count))
    }

    static func frame(_ length: Int) -> [UInt8] { (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) } }

    /// Nothing was written into the buffers at `gpas` (`count` bytes each) and nothing consumed.
    func assertNothingConsumed(_ gpas: [UInt64], _ count: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertEqual(position.lastAvail, 0, "no avail entry consumed", file: file, line: line)
        XCTAssertEqual(position.usedIdx, 0, "no used entry written", file: file, line: line)
        for gpa in gpas {
            XCTAssertEqual(bytes(gpa, count), [UInt8](repeating: Self.untouched, count: count), "buffer 0x\(String(gpa, radix: 16)) written",
                           file: file, line: line)
        }
        XCTAssertEqual(try publishAndPop(), [], file: file, line: line)
    }

    // MARK: written

    func testFrameInOneChain() throws {
        let (head, gpas) = post([2048])
        let frame = Self.frame(100)
        XCTAssertEqual(try write(frame), .written(chains: 1))
        XCTAssertEqual(position, RXPosition(lastAvail: 1, usedIdx: 1, availCache: 1))
        XCTAssertEqual(try publishAndPop(), [UsedElement(id: UInt32(head), length: 112)])
        XCTAssertEqual(bytes(gpas[0], 12), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zeroed header, num_buffers = 1")
        XCTAssertEqual(bytes(gpas[0] + 12, 100), frame)
        XCTAssertEqual(bytes(gpas[0] + 112, 4), [UInt8](repeating: Self.untouched, count: 4), "nothing past the frame")
    }

    func testFrameAcrossTheBuffersOfOneChainAndTheShortHeader() throws {
        let (head, gpas) = post([14, 200])
        let frame = Self.frame(60)
        XCTAssertEqual(try write(frame, header: 10), .written(chains: 1))
        XCTAssertEqual(try publishAndPop(), [UsedElement(id: UInt32(head), length: 70)])
        XCTAssertEqual(bytes(gpas[0], 10), [UInt8](repeating: 0, count: 10), "a 10-byte header has no num_buffers")
        XCTAssertEqual(bytes(gpas[0] + 10, 4) + bytes(gpas[1], 56), frame)
    }

    /// MRG_RXBUF: a frame larger than one chain spans several, each with its own used entry, and
    /// num_buffers counts them.
    func testMergeableFrameAcrossChains() throws {
        let a = post([64]), b = post([64]), c = post([64]), d = post([64])
        let frame = Self.frame(150)  // 162 bytes with the header: 64 + 64 + 34
        XCTAssertEqual(try write(frame, mergeable: true), .written(chains: 3))
        XCTAssertEqual(position, RXPosition(lastAvail: 3, usedIdx: 3, availCache: 4))
        XCTAssertEqual(try publishAndPop(), [UsedElement(id: UInt32(a.head), length: 64), UsedElement(id: UInt32(b.head), length: 64),
                                             UsedElement(id: UInt32(c.head), length: 34)])
        XCTAssertEqual(bytes(a.gpas[0], 12), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0], "num_buffers = 3")
        XCTAssertEqual(bytes(a.gpas[0] + 12, 52) + bytes(b.gpas[0], 64) + bytes(c.gpas[0], 34), frame)
        XCTAssertEqual(bytes(d.gpas[0], 64), [UInt8](repeating: Self.untouched, count: 64), "the fourth chain is not used")
        // The next frame starts at the fourth chain.
        XCTAssertEqual(try write(Self.frame(20), mergeable: true), .written(chains: 1))
        XCTAssertEqual(try publishAndPop(), [UsedElement(id: UInt32(d.head), length: 32)])
    }

    // MARK: nothing consumed

    func testNoBufferPosted() throws {
        XCTAssertEqual(try write(Self.frame(60)), .dropped(.noBuffer))
        try assertNothingConsumed([], 0)
    }

    /// Without MRG_RXBUF a frame larger than the chain is dropped before any byte is written.
    func testBufferTooSmallWritesAndConsumesNothing() throws {
        let (_, gpas) = post([64, 32])
        XCTAssertEqual(try write(Self.frame(100)), .dropped(.bufferTooSmall))
        try assertNothingConsumed(gpas, 32)
    }

    /// With MRG_RXBUF, a frame larger than every chain posted so far waits for more buffers
    /// (`noBuffer`, which the engine may leave uncounted); nothing of it is written meanwhile.
    func testMergeableFrameLargerThanThePostedChainsWritesNothing() throws {
        let a = post([64]), b = post([64])
        XCTAssertEqual(try write(Self.frame(200), mergeable: true), .dropped(.noBuffer))
        try assertNothingConsumed(a.gpas + b.gpas, 64)
        // A chain with no writable byte cannot carry any of it.
        let c = ring.addChain([DriverBuffer(gpa: nextBuffer, length: 64, isWritable: false)])!
        ring.publish()
        XCTAssertEqual(try write(Self.frame(200), mergeable: true), .dropped(.bufferTooSmall))
        try assertNothingConsumed(a.gpas + b.gpas, 64)
        _ = c
    }

    /// With MRG_RXBUF and every entry of the ring posted, a frame larger than all of them
    /// together can never fit: `bufferTooSmall` (counted, and the wire does not keep it), not
    /// `noBuffer` (which would hold it, and every frame behind it, forever).
    func testMergeableFrameLargerThanAFullRingIsTooLargeNotWaiting() throws {
        var gpas: [UInt64] = []
        for _ in 0..<Int(Self.ringSize) { gpas += post([16]).gpas }
        XCTAssertEqual(try write(Self.frame(Int(Self.ringSize) * 16), mergeable: true), .dropped(.bufferTooSmall))
        try assertNothingConsumed(gpas, 16)
    }

    /// The header must fit whole in the first writable buffer.
    func testFirstBufferSmallerThanTheHeader() throws {
        let (_, gpas) = post([8, 2048])
        XCTAssertEqual(try write(Self.frame(40)), .dropped(.bufferTooSmall))
        try assertNothingConsumed(gpas, 8)
    }

    // MARK: faults

    /// A buffer outside guest memory is a fault of the ring; nothing is written, not even into
    /// the good chains before it (the frame is checked to fit before any byte is written).
    func testChainOutsideGuestMemoryFaultsWithoutWriting() throws {
        let good = post([64])
        let bad = ring.addChain([DriverBuffer(gpa: 1 << 30, length: 4096, isWritable: true)])!
        ring.publish()
        guard let text = fault(Self.frame(150), mergeable: true) else { return }
        XCTAssertTrue(text.contains("RX chain at avail index 0"), text)
        XCTAssertTrue(text.contains("outside guest memory"), text)
        try assertNothingConsumed(good.gpas, 64)
        _ = bad
    }

    func testAvailIndexJumpingPastTheRingSizeFaults() throws {
        // The driver claims 100 entries in a ring of 8.
        ring.avail.storeBytes(of: UInt16(100).littleEndian, toByteOffset: 2, as: UInt16.self)
        guard let text = fault(Self.frame(60)) else { return }
        XCTAssertEqual(text, "avail index jumped from 0 to 100, more than the ring size 8")
        XCTAssertEqual(position.lastAvail, 0)
        XCTAssertEqual(position.usedIdx, 0)
    }
}
