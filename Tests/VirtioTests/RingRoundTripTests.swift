import XCTest
@testable import Virtio

/// A driver (DriverSplitRing) and a device (SplitQueue + walker) sharing flat guest memory.
final class RingHarness {
    static let baseGPA: UInt64 = 0x10_0000
    static let ringGPA: UInt64 = 0x10_0000
    static let tablesGPA: UInt64 = 0x11_0000
    static let dataGPA: UInt64 = 0x12_0000

    let memory = FlatGuestMemory(size: 0x4_0000, baseGPA: RingHarness.baseGPA)
    let driver: DriverSplitRing
    let queue: SplitQueue
    let eventIdx: Bool
    var walker: DescriptorChainWalker
    var lastAvail: UInt16 = 0
    var usedIndex: UInt16 = 0

    init(size: UInt16 = 8, eventIdx: Bool) throws {
        self.eventIdx = eventIdx
        driver = try DriverSplitRing(size: size, eventIdx: eventIdx, baseGPA: Self.ringGPA, memory: memory)
        queue = driver.deviceQueue()
        walker = DescriptorChainWalker(capacity: size, indirectAllowed: true)
    }

    /// Per-slot buffers: 4 readable bytes then 4 writable bytes; one indirect table per slot.
    func readableGPA(_ slot: Int) -> UInt64 { Self.dataGPA + UInt64(slot) * 16 }
    func writableGPA(_ slot: Int) -> UInt64 { readableGPA(slot) + 8 }
    func tableGPA(_ slot: Int) -> UInt64 { Self.tablesGPA + UInt64(slot) * 32 }

    /// Adds a request carrying `seq` (direct or indirect); returns the head.
    func addRequest(seq: UInt32, slot: Int, indirect: Bool) -> UInt16? {
        memory.pointer(gpa: readableGPA(slot), length: 4).storeBytes(of: seq, as: UInt32.self)
        memory.pointer(gpa: writableGPA(slot), length: 4).storeBytes(of: 0, as: UInt32.self)
        let buffers = [DriverBuffer(gpa: readableGPA(slot), length: 4, isWritable: false),
                       DriverBuffer(gpa: writableGPA(slot), length: 4, isWritable: true)]
        if indirect {
            return driver.addIndirectChain(buffers, table: memory.pointer(gpa: tableGPA(slot), length: 32),
                                           tableGPA: tableGPA(slot))
        }
        return driver.addChain(buffers)
    }

    /// The device handles everything available: reads seq, writes seq + 1, completes with len 4.
    /// Returns the number completed and whether the driver wants an interrupt.
    func deviceDrain() throws -> (completed: Int, interrupt: Bool) {
        let availIndex = queue.loadAvailIndex()
        let oldUsed = usedIndex
        var completed = 0
        while lastAvail != availIndex {
            let head = queue.availHead(at: lastAvail)
            lastAvail &+= 1
            let chain = try walker.walk(head: head, queue: queue, memory: memory)
            XCTAssertEqual(chain.readableBytes, 4)
            XCTAssertEqual(chain.writableBytes, 4)
            let seq = chain[0].host.loadUnaligned(as: UInt32.self)
            chain[chain.firstWritableIndex].host.storeBytes(of: seq &+ 1, as: UInt32.self)
            queue.writeUsedElement(at: usedIndex, id: UInt32(head), length: 4)
            usedIndex &+= 1
            completed += 1
        }
        guard completed > 0 else { return (0, false) }
        queue.publishUsedIndex(usedIndex)
        return (completed, queue.needsInterrupt(oldUsed: oldUsed, newUsed: usedIndex, eventIdx: eventIdx))
    }
}

final class RingRoundTripTests: XCTestCase {
    func testRoundTripWrapsIndicesPast65535() throws {
        let h = try RingHarness(size: 8, eventIdx: false)
        var seq: UInt32 = 0
        var inFlight: [(head: UInt16, seq: UInt32, slot: Int)] = []
        var total = 0
        for round in 0..<50_000 {
            let batch = round % 3 + 1
            for _ in 0..<batch {
                let slot = Int(seq % 16)
                let head = try XCTUnwrap(h.addRequest(seq: seq, slot: slot, indirect: seq % 5 == 0))
                inFlight.append((head, seq, slot))
                seq &+= 1
            }
            h.driver.publish()
            let (completed, _) = try h.deviceDrain()
            XCTAssertEqual(completed, batch)
            for expected in inFlight {
                let used = try XCTUnwrap(try h.driver.popUsed())
                XCTAssertEqual(used, UsedElement(id: UInt32(expected.head), length: 4))
                let reply = h.memory.pointer(gpa: h.writableGPA(expected.slot)).loadUnaligned(as: UInt32.self)
                XCTAssertEqual(reply, expected.seq &+ 1)
            }
            XCTAssertNil(try h.driver.popUsed())
            total += inFlight.count
            inFlight.removeAll(keepingCapacity: true)
            XCTAssertEqual(h.driver.freeCount, 8)
        }
        XCTAssertGreaterThan(total, 65536 * 1)
        XCTAssertEqual(h.driver.availIndex, UInt16(truncatingIfNeeded: total))
        XCTAssertEqual(h.driver.lastUsedIndex, UInt16(truncatingIfNeeded: total))
        XCTAssertEqual(h.queue.loadUsedIndex(), UInt16(truncatingIfNeeded: total))
        XCTAssertEqual(h.lastAvail, UInt16(truncatingIfNeeded: total))
    }

    func testEventIdxSuppressesKicksAndInterruptsAcrossWraparound() throws {
        let h = try RingHarness(size: 8, eventIdx: true)
        var seq: UInt32 = 0
        var kicks = 0
        var interrupts = 0
        XCTAssertFalse(h.queue.enableNotifications(eventIdx: true, lastAvailIndex: h.lastAvail))
        for round in 0..<40_000 {
            // The device is idle with avail_event = lastAvail: the first publish kicks, the
            // second (window already past avail_event) does not.
            _ = try XCTUnwrap(h.addRequest(seq: seq, slot: Int(seq % 16), indirect: false)); seq &+= 1
            h.driver.publish()
            XCTAssertTrue(h.driver.kickNeeded(), "round \(round)")
            _ = try XCTUnwrap(h.addRequest(seq: seq, slot: Int(seq % 16), indirect: true)); seq &+= 1
            h.driver.publish()
            XCTAssertFalse(h.driver.kickNeeded(), "round \(round)")
            kicks += 1

            // Even rounds: the driver asks for an interrupt at its next used entry. Odd rounds:
            // it leaves used_event behind, so the device must stay quiet.
            let wantInterrupt = round % 2 == 0
            if wantInterrupt { XCTAssertFalse(h.driver.enableInterrupts()) }
            let (completed, interrupt) = try h.deviceDrain()
            XCTAssertEqual(completed, 2)
            XCTAssertEqual(interrupt, wantInterrupt, "round \(round)")
            if interrupt { interrupts += 1 }
            while try h.driver.popUsed() != nil {}
            XCTAssertFalse(h.queue.enableNotifications(eventIdx: true, lastAvailIndex: h.lastAvail))
        }
        XCTAssertEqual(kicks, 40_000)
        XCTAssertEqual(interrupts, 20_000)
        XCTAssertEqual(h.driver.availIndex, UInt16(truncatingIfNeeded: 80_000))
    }

    func testUsedEventFurtherAheadDelaysTheInterrupt() throws {
        let h = try RingHarness(size: 8, eventIdx: true)
        // Interrupt only once used.idx passes 3 (i.e. the 4th completion).
        h.driver.setUsedEvent(3)
        var interrupts: [Bool] = []
        for seq: UInt32 in 0..<6 {
            _ = try XCTUnwrap(h.addRequest(seq: seq, slot: Int(seq), indirect: false))
            h.driver.publish()
            interrupts.append(try h.deviceDrain().interrupt)
            _ = try h.driver.popUsed()
        }
        XCTAssertEqual(interrupts, [false, false, false, true, false, false])
    }

    func testEnableNotificationsReportsARacingPublish() throws {
        let h = try RingHarness(size: 8, eventIdx: true)
        _ = try XCTUnwrap(h.addRequest(seq: 1, slot: 0, indirect: false))
        h.driver.publish()
        // The device went idle at 0 but the driver slipped one in: it must not sleep.
        XCTAssertTrue(h.queue.enableNotifications(eventIdx: true, lastAvailIndex: 0))
        XCTAssertEqual(try h.deviceDrain().completed, 1)
        XCTAssertFalse(h.queue.enableNotifications(eventIdx: true, lastAvailIndex: h.lastAvail))
    }

    func testFlagsSuppressKicksAndInterruptsWithoutEventIdx() throws {
        let h = try RingHarness(size: 8, eventIdx: false)
        h.queue.disableNotifications(eventIdx: false)
        XCTAssertEqual(h.queue.loadUsedFlags(), SplitRingLayout.usedFlagNoNotify)
        _ = try XCTUnwrap(h.addRequest(seq: 0, slot: 0, indirect: false))
        h.driver.publish()
        XCTAssertFalse(h.driver.kickNeeded())
        XCTAssertTrue(h.queue.enableNotifications(eventIdx: false, lastAvailIndex: h.lastAvail))
        XCTAssertEqual(h.queue.loadUsedFlags(), 0)
        _ = try XCTUnwrap(h.addRequest(seq: 1, slot: 1, indirect: false))
        h.driver.publish()
        XCTAssertTrue(h.driver.kickNeeded())

        h.driver.disableInterrupts()
        XCTAssertEqual(h.driver.loadAvailFlags(), SplitRingLayout.availFlagNoInterrupt)
        XCTAssertEqual(try h.deviceDrain().interrupt, false)
        XCTAssertTrue(h.driver.enableInterrupts()) // two used entries pending
        _ = try XCTUnwrap(h.addRequest(seq: 2, slot: 2, indirect: false))
        h.driver.publish()
        XCTAssertEqual(try h.deviceDrain().interrupt, true)
    }

    func testFreeListExhaustionAndRecovery() throws {
        let h = try RingHarness(size: 8, eventIdx: false)
        let b = { (i: Int) in DriverBuffer(gpa: h.readableGPA(i), length: 4, isWritable: false) }
        XCTAssertNotNil(h.driver.addChain((0..<3).map(b)))
        XCTAssertNotNil(h.driver.addChain((3..<6).map(b)))
        XCTAssertNil(h.driver.addChain((0..<3).map(b)))
        XCTAssertNil(h.driver.addChain([DriverBuffer]()))
        XCTAssertNotNil(h.driver.addChain((6..<8).map(b)))
        XCTAssertEqual(h.driver.freeCount, 0)
        XCTAssertNil(h.driver.addIndirectChain([b(0)], table: h.memory.pointer(gpa: h.tableGPA(0)), tableGPA: h.tableGPA(0)))
        h.driver.publish()
        // Complete out of order: the last chain first.
        var heads: [UInt16] = []
        while h.lastAvail != h.queue.loadAvailIndex() { heads.append(h.queue.availHead(at: h.lastAvail)); h.lastAvail &+= 1 }
        for head in heads.reversed() {
            h.queue.writeUsedElement(at: h.usedIndex, id: UInt32(head), length: 0)
            h.usedIndex &+= 1
        }
        h.queue.publishUsedIndex(h.usedIndex)
        var popped: [UInt16] = []
        while let u = try h.driver.popUsed() { popped.append(UInt16(u.id)) }
        XCTAssertEqual(popped, heads.reversed())
        XCTAssertEqual(h.driver.freeCount, 8)
        XCTAssertNotNil(h.driver.addChain((0..<8).map(b)))
    }

    func testPopUsedRejectsIdsNotInFlight() throws {
        let h = try RingHarness(size: 8, eventIdx: false)
        let head = try XCTUnwrap(h.addRequest(seq: 0, slot: 0, indirect: false))
        h.driver.publish()
        let bogus = UInt32((head + 2) % 8)
        h.queue.writeUsedElement(at: 0, id: bogus, length: 0)
        h.queue.publishUsedIndex(1)
        XCTAssertThrowsError(try h.driver.popUsed()) { XCTAssertEqual($0 as? SplitRingError, .usedIdInvalid(bogus)) }
        h.queue.writeUsedElement(at: 0, id: 1000, length: 0)
        XCTAssertThrowsError(try h.driver.popUsed()) { XCTAssertEqual($0 as? SplitRingError, .usedIdInvalid(1000)) }
    }

    func testHostileChainThroughTheRingIsAnErrorNotACrash() throws {
        let h = try RingHarness(size: 8, eventIdx: false)
        h.driver.writeDescriptor(VirtqDescriptor(addr: h.readableGPA(0), len: 4, flags: .next, next: 5), at: 4)
        h.driver.writeDescriptor(VirtqDescriptor(addr: h.readableGPA(1), len: 4, flags: .next, next: 4), at: 5)
        h.driver.pushAvailHead(4)
        h.driver.pushAvailHead(200)
        h.driver.publish()
        XCTAssertEqual(h.queue.loadAvailIndex(), 2)
        XCTAssertThrowsError(try h.walker.walk(head: h.queue.availHead(at: 0), queue: h.queue, memory: h.memory)) {
            XCTAssertEqual($0 as? ChainError, .loop(index: 4, ttl: 8))
        }
        XCTAssertThrowsError(try h.walker.walk(head: h.queue.availHead(at: 1), queue: h.queue, memory: h.memory)) {
            XCTAssertEqual($0 as? ChainError, .headOutOfRange(head: 200, queueSize: 8))
        }
    }
}

final class SplitQueueTests: XCTestCase {
    func testSetupChecksSizeAndAlignment() throws {
        let m = FlatGuestMemory(size: 0x1000)
        let b = m.base
        XCTAssertThrowsError(try SplitQueue(size: 6, descriptorTable: b, avail: b + 0x200, used: b + 0x400)) {
            XCTAssertEqual($0 as? SplitRingError, .invalidQueueSize(6))
        }
        XCTAssertThrowsError(try SplitQueue(size: 8, descriptorTable: b + 8, avail: b + 0x200, used: b + 0x400)) {
            XCTAssertEqual($0 as? SplitRingError, .misaligned(area: .descriptorTable, address: UInt(bitPattern: b + 8)))
        }
        XCTAssertThrowsError(try SplitQueue(size: 8, descriptorTable: b, avail: b + 0x201, used: b + 0x400)) {
            XCTAssertEqual($0 as? SplitRingError, .misaligned(area: .avail, address: UInt(bitPattern: b + 0x201)))
        }
        XCTAssertThrowsError(try SplitQueue(size: 8, descriptorTable: b, avail: b + 0x200, used: b + 0x402)) {
            XCTAssertEqual($0 as? SplitRingError, .misaligned(area: .used, address: UInt(bitPattern: b + 0x402)))
        }
        XCTAssertNoThrow(try SplitQueue(size: 8, descriptorTable: b, avail: b + 0x202, used: b + 0x404))
    }

    func testSetupThroughGuestMemoryChecksEveryArea() throws {
        let m = FlatGuestMemory(size: 0x1000, baseGPA: 0x4000)
        XCTAssertNoThrow(try SplitQueue(size: 8, descriptorTableGPA: 0x4000, availGPA: 0x4080, usedGPA: 0x4100, memory: m))
        // used ring of 6 + 64 bytes starting 0x40 before the end does not fit.
        XCTAssertThrowsError(try SplitQueue(size: 8, descriptorTableGPA: 0x4000, availGPA: 0x4080, usedGPA: 0x4FC0, memory: m)) {
            XCTAssertEqual($0 as? SplitRingError, .notMapped(area: .used, gpa: 0x4FC0, length: 70))
        }
        XCTAssertThrowsError(try SplitQueue(size: 8, descriptorTableGPA: 0x3FF0, availGPA: 0x4080, usedGPA: 0x4100, memory: m)) {
            XCTAssertEqual($0 as? SplitRingError, .notMapped(area: .descriptorTable, gpa: 0x3FF0, length: 128))
        }
    }

    func testFieldPlacementIsLittleEndianAtSpecOffsets() throws {
        let m = FlatGuestMemory(size: 0x1000)
        let q = try SplitQueue(size: 8, descriptorTable: m.base, avail: m.base + 0x200, used: m.base + 0x400)
        q.writeUsedElement(at: 9, id: 0x0102_0304, length: 0x0A0B_0C0D) // slot 1
        let element = UnsafeRawBufferPointer(start: m.base + 0x400 + 4 + 8, count: 8)
        XCTAssertEqual(Array(element), [0x04, 0x03, 0x02, 0x01, 0x0D, 0x0C, 0x0B, 0x0A])
        q.publishUsedIndex(0xBEEF)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: m.base + 0x402, count: 2)), [0xEF, 0xBE])
        q.storeAvailEvent(0x1234)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: m.base + 0x400 + 4 + 64, count: 2)), [0x34, 0x12])
        (m.base + 0x200 + 4 + 16).storeBytes(of: UInt16(0x5678).littleEndian, as: UInt16.self)
        XCTAssertEqual(q.loadUsedEvent(), 0x5678)
        (m.base + 0x200 + 2).storeBytes(of: UInt16(0x0102).littleEndian, as: UInt16.self)
        XCTAssertEqual(q.loadAvailIndex(), 0x0102)
        (m.base + 0x200 + 4 + 2 * 3).storeBytes(of: UInt16(7).littleEndian, as: UInt16.self)
        XCTAssertEqual(q.availHead(at: 0xFFFB), 7) // 0xFFFB mod 8 = 3
    }
}
