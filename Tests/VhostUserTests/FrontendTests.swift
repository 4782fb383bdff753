#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import Virtio
import VhostUser
import VhostUserFrontend
import XCTest

final class FrontendTests: XCTestCase {
    private var testpmd: FrontendTestPMD?

    override func tearDown() {
        testpmd?.stop(removeLog: (testRun?.totalFailureCount ?? 1) == 0)   // keep the log of a failed run
        testpmd = nil
        super.tearDown()
    }

    // MARK: RingPlacement

    func testRingPlacementFollowsSplitRingAlignmentAndSizes() throws {
        let rings = try RingPlacement.layout(rings: 2, size: 256, startGPA: 0x1000)
        XCTAssertEqual(rings[0], PlacedRing(index: 0, size: 256, descGPA: 0x1000, availGPA: 0x2000, usedGPA: 0x2208))
        // avail: 6 + 2*256 = 518 bytes, 0x2000 + 518 = 0x2206, rounded up to 4 for the used ring.
        XCTAssertEqual(rings[0].endGPA, 0x2208 + 6 + 8 * 256)
        XCTAssertEqual(rings[1].index, 1)
        XCTAssertEqual(rings[1].descGPA, (rings[0].endGPA + 15) / 16 * 16)
        XCTAssertEqual(rings[1].availGPA, rings[1].descGPA + 16 * 256)

        // Size 2: desc 32 bytes, avail 10 bytes at 32 (ends at 42), used 4-aligned at 44, 22 bytes.
        let small = try RingPlacement.layout(rings: 2, size: 2, startGPA: 0)
        XCTAssertEqual(small[0], PlacedRing(index: 0, size: 2, descGPA: 0, availGPA: 32, usedGPA: 44))
        XCTAssertEqual(small[0].endGPA, 66)
        XCTAssertEqual(small[1].descGPA, 80)
        // An unaligned start is rounded up to 16.
        XCTAssertEqual(try RingPlacement.layout(rings: 1, size: 4, startGPA: 0x1001)[0].descGPA, 0x1010)
        // Page-aligned rings when asked.
        let paged = try RingPlacement.layout(rings: 2, size: 256, startGPA: 0, firstIndex: 4, ringAlignment: 4096)
        XCTAssertEqual(paged.map(\.descGPA), [0, 0x2000])   // ring 0 ends at 4096+518+2+2054 = 6670
        XCTAssertEqual(paged.map(\.index), [4, 5])

        XCTAssertThrowsError(try RingPlacement.layout(rings: 1, size: 0, startGPA: 0))
        XCTAssertThrowsError(try RingPlacement.layout(rings: 1, size: 32769, startGPA: 0))
        XCTAssertThrowsError(try RingPlacement.layout(rings: 1, size: 8, startGPA: 0, ringAlignment: 24))
    }

    func testRingFieldAddresses() throws {
        let r = try RingPlacement.layout(rings: 1, size: 8, startGPA: 0x10000)[0]
        XCTAssertEqual(r.availIdxGPA, r.availGPA + 2)
        XCTAssertEqual(r.availEntryGPA(9), r.availGPA + 4 + 2)      // slot wraps modulo the size
        XCTAssertEqual(r.usedEventGPA, r.availGPA + 4 + 16)
        XCTAssertEqual(r.usedIdxGPA, r.usedGPA + 2)
        XCTAssertEqual(r.usedEntryGPA(3), r.usedGPA + 4 + 24)
        XCTAssertEqual(r.availEventGPA, r.usedGPA + 4 + 64)
        XCTAssertEqual(r.descGPA(2), r.descGPA + 32)
    }

    func testRingPlacementInsideGuestRAMChecksThatRingsFit() throws {
        let ram = try GuestRAM(baseGPA: 0x100000, size: 0x4000)
        let rings = try RingPlacement.place(rings: 2, size: 256, in: ram, offset: 0x100)
        XCTAssertEqual(rings[0].descGPA, 0x100100)
        XCTAssertTrue(ram.contains(gpa: rings[1].descGPA, length: rings[1].endGPA - rings[1].descGPA))
        XCTAssertThrowsError(try RingPlacement.place(rings: 3, size: 256, in: ram)) { error in
            guard case .unmappedAddress = error as? FrontendError else { return XCTFail("\(error)") }
        }
    }

    // MARK: GuestRAM

    func testGuestRAMReadWriteAndTranslation() throws {
        let ram = try GuestRAM(baseGPA: 0x200000, size: 0x10000, name: "fe-test")
        XCTAssertEqual(ram.endGPA, 0x210000)
        try ram.write([1, 2, 3, 4, 5], at: 0x200ffe)
        XCTAssertEqual(try ram.read(at: 0x200ffe, count: 5), [1, 2, 3, 4, 5])
        try ram.store(UInt32(0xA1B2_C3D4), at: 0x200101)            // unaligned is fine
        XCTAssertEqual(try ram.read(at: 0x200101, count: 4), [0xD4, 0xC3, 0xB2, 0xA1])
        XCTAssertEqual(try ram.load(UInt32.self, at: 0x200101), 0xA1B2_C3D4)
        try ram.storeRelease(0xBEEF, at: 0x200200)
        XCTAssertEqual(try ram.loadAcquire(UInt16.self, at: 0x200200), 0xBEEF)
        XCTAssertThrowsError(try ram.storeRelease(1, at: 0x200201))  // ring indices are 2-aligned

        XCTAssertEqual(ram.userAddress(ofGPA: 0x200010), ram.userAddress + 0x10)
        XCTAssertNil(ram.userAddress(ofGPA: 0x210000))
        XCTAssertEqual(ram.regionDescription,
                       MemoryRegionDescription(guestPhysAddr: 0x200000, size: 0x10000, userAddr: ram.userAddress, mmapOffset: 0))

        // Out of range, straddling the end, and overflowing lengths are refused.
        XCTAssertThrowsError(try ram.read(at: 0x1fffff, count: 1))
        XCTAssertThrowsError(try ram.write([0, 0], at: 0x20ffff)) { error in
            XCTAssertEqual(error as? FrontendError, .unmappedAddress(gpa: 0x20ffff, length: 2))
        }
        XCTAssertFalse(ram.contains(gpa: 0x200000, length: .max))
        XCTAssertThrowsError(try GuestRAM(baseGPA: 0x1001, size: 0x1000))
        XCTAssertThrowsError(try GuestRAM(baseGPA: 0, size: 100))
    }

    func testGuestRAMIsTheMemfdContent() throws {
        // What the backend maps from the fd is what we wrote through our mapping.
        let ram = try GuestRAM(baseGPA: 0, size: 0x2000)
        try ram.write(Array("hello backend".utf8), at: 0x1800)
        var seen = [UInt8](repeating: 0, count: 13)
        XCTAssertEqual(pread(ram.fd, &seen, 13, 0x1800), 13)
        XCTAssertEqual(String(decoding: seen, as: UTF8.self), "hello backend")
    }

    func testSeveralRegionsWithAGap() throws {
        let low = try GuestRAM(baseGPA: 0, size: 0x100000)
        let high = try GuestRAM(baseGPA: 0x400000, size: 0x100000)
        let ram = [low, high]
        XCTAssertEqual(ram.endGPA, 0x500000)
        XCTAssertTrue(ram.region(containing: 0x400010) === high)
        XCTAssertNil(ram.region(containing: 0x200000))                // in the gap
        XCTAssertNil(ram.region(containing: 0xff000, length: 0x2000))  // runs off the end of `low`
        XCTAssertEqual(try ram.userAddress(ofGPA: 0x400010), high.userAddress + 0x10)
        XCTAssertThrowsError(try ram.userAddress(ofGPA: 0x300000))
        try ram.write([9, 8, 7], at: 0x4ffffd)
        XCTAssertEqual(try high.read(at: 0x4ffffd, count: 3), [9, 8, 7])
        XCTAssertThrowsError(try ram.write([1], at: 0x100000))
    }

    func testRegionsSharingOneMemfdHaveMmapOffsets() throws {
        let regions = try GuestRAM.regions(sharingOneMemfd: [(baseGPA: 0, size: 0x3000), (baseGPA: 0x100000, size: 0x2000)])
        XCTAssertEqual(regions.map(\.mmapOffset), [0, 0x3000])
        XCTAssertEqual(regions[0].fd, regions[1].fd)
        XCTAssertEqual(regions[1].regionDescription.mmapOffset, 0x3000)
        try regions[1].write([0x5A], at: 0x100001)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(regions[1].fd, &byte, 1, 0x3001), 1)  // file offset = mmapOffset + 1
        XCTAssertEqual(byte, 0x5A)
    }

    // MARK: dirty log

    func testLogSizeCoversRAMInWholeWords() {
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 0), 8)
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 4096), 8)
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 64 * 4096), 8)
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 64 * 4096 + 1), 16)  // page 64 needs byte 8
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 8 << 20), 256)         // 2048 pages
        XCTAssertEqual(DirtyLogBuffer.requiredSize(ramEndGPA: 256 << 20), 8192)      // QEMU: 256 MiB guest
    }

    func testLogBitmapDecodingMatchesTheSpecByteLayout() throws {
        let log = try DirtyLogBuffer(ramEndGPA: 1 << 20, offset: 16)   // 256 pages, 32 bytes
        XCTAssertEqual(log.size, 32)
        XCTAssertEqual(log.logDescription, LogDescription(size: 32, offset: 16))
        XCTAssertEqual(log.dirtyPages(), [])

        // A backend marks pages as the spec says: log[page / 8] |= 1 << page % 8, at `offset` in the fd.
        let pages: [UInt64] = [0, 9, 63, 64, 200, 255]
        for page in pages {
            var byte: UInt8 = 0
            XCTAssertEqual(pread(log.fd, &byte, 1, off_t(16 + page / 8)), 1)
            byte |= 1 << (page % 8)
            XCTAssertEqual(pwrite(log.fd, &byte, 1, off_t(16 + page / 8)), 1)
        }
        XCTAssertEqual(log.dirtyPages(), pages)
        XCTAssertTrue(log.isDirty(page: 200))
        XCTAssertFalse(log.isDirty(page: 201))
        XCTAssertFalse(log.isDirty(page: 10_000))                 // beyond the log: not dirty, no trap
        XCTAssertTrue(log.isDirty(gpa: 201 * 4096 - 1, length: 2))   // straddles pages 200 and 201
        XCTAssertFalse(log.isDirty(gpa: 201 * 4096, length: 4096))
        XCTAssertEqual(log.bytes()[25], 1)                         // page 200 = byte 25 bit 0

        XCTAssertEqual(log.takeDirtyPages(), pages)
        XCTAssertEqual(log.dirtyPages(), [])
        log.markDirty(page: 130)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(log.fd, &byte, 1, off_t(16 + 130 / 8)), 1)
        XCTAssertEqual(byte, 1 << 2)
        log.clearLog()
        XCTAssertFalse(log.isDirty(page: 130))
    }

    // MARK: message plumbing against a scripted backend

    func testRepliesTimeoutsAndClosedConnection() throws {
        let path = "/tmp/fe-fake-\(getpid()).sock"
        let fake = try FrontendFakeBackend(path: path, script: [
            .expect(.getFeatures, reply: (VhostUserRequest.getFeatures.rawValue, FrontendFakeBackend.u64(VirtioFeature.version1 | VirtioFeature.vhostLogAll))),
            .expect(.setOwner, reply: nil),
            .expect(.setFeatures, reply: nil),
            .expect(.getQueueNum, reply: nil),                       // never answered: the frontend times out
            .expect(.getFeatures, reply: (VhostUserRequest.getProtocolFeatures.rawValue, FrontendFakeBackend.u64(0))),
            .expect(.getVringBase, reply: (VhostUserRequest.getVringBase.rawValue, [1, 0, 0, 0, 7, 0, 0, 0])),
            .close(afterReading: true),
        ])
        let fe = try VhostUserFrontend.acceptOne(listeningAt: path, timeout: .seconds(5), replyTimeout: .milliseconds(300))
        let n = try fe.negotiate(features: VirtioFeature.version1 | VirtioFeature.vhostUserProtocolFeatures | VirtioNetFeature.mrgRxbuf)
        XCTAssertEqual(n.offeredFeatures, VirtioFeature.version1 | VirtioFeature.vhostLogAll)
        XCTAssertEqual(n.ackedFeatures, VirtioFeature.version1)       // intersection; no protocol features offered
        XCTAssertEqual(fe.ackedProtocolFeatures, 0)
        XCTAssertFalse(fe.protocolFeaturesNegotiated)

        XCTAssertThrowsError(try fe.request(.getQueueNum)) { error in
            guard case .timedOut = error as? FrontendError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try fe.request(.getFeatures)) { error in
            XCTAssertEqual(error as? FrontendError,
                           .malformedReply(request: "GET_FEATURES", reason: "reply is for GET_PROTOCOL_FEATURES"))
        }
        XCTAssertThrowsError(try fe.getVringBase(index: 0)) { error in   // answers for ring 1
            guard case .malformedReply = error as? FrontendError else { return XCTFail("\(error)") }
        }
        // SET_LOG_BASE without LOG_SHMFD is refused before anything is sent.
        XCTAssertThrowsError(try fe.enableLogging()) { error in
            guard case .notNegotiated = error as? FrontendError else { return XCTFail("\(error)") }
        }
        try fe.sendRaw(bytes: VhostUserCodec.encodeRequest(.getFeatures, payload: .none))
        XCTAssertTrue(try fe.backendClosesConnection(within: .seconds(5)))
        XCTAssertThrowsError(try fe.readReply(timeout: .seconds(1))) { error in
            guard case .backendClosed = error as? FrontendError else { return XCTFail("\(error)") }
            XCTAssertTrue("\(error)".contains("backend closed the connection"))
        }
        XCTAssertEqual(fake.join(), [])
    }

    func testConnectTimesOutWhenNoBackendListens() {
        let start = ContinuousClock.now
        XCTAssertThrowsError(try VhostUserFrontend(connectingTo: "/tmp/fe-nobody-\(getpid()).sock", timeout: .milliseconds(200))) { error in
            guard case .connectTimedOut = error as? FrontendError else { return XCTFail("\(error)") }
        }
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(3))
    }

    // MARK: interop with DPDK 22.11's vhost PMD (testpmd as the vhost-user server)

    func testDriverStepsAgainstDPDKVhostPMD() throws {
        let binary = try FrontendTestPMD.requireBinary()
        let pmd = try FrontendTestPMD(binary: binary, tag: "drv")
        testpmd = pmd
        let fe: VhostUserFrontend
        do {
            fe = try VhostUserFrontend(connectingTo: pmd.socketPath, timeout: .seconds(30), replyTimeout: .seconds(5))
        } catch {
            XCTFail("connect: \(error)\n--- testpmd (running: \(pmd.isRunning)) ---\n\(pmd.logTail())")
            return
        }
        do {
            try driveTestPMD(fe, pmd)
        } catch {
            XCTFail("\(error)\n--- testpmd (running: \(pmd.isRunning)) ---\n\(pmd.logTail())")
        }
    }

    private func driveTestPMD(_ fe: VhostUserFrontend, _ pmd: FrontendTestPMD) throws {
        // 1. Negotiation, in QEMU's order.
        let wanted = VhostUserFrontend.defaultFeatures | VirtioNetFeature.mrgRxbuf
        let n = try fe.negotiate(features: wanted)
        print("testpmd offers features \(describeFeatures(n.offeredFeatures)) (0x\(String(n.offeredFeatures, radix: 16))), "
            + "protocol features \(VhostUserProtocolFeature.describe(n.offeredProtocolFeatures)), queue num \(n.queueCount.map(String.init) ?? "-")")
        XCTAssertNotEqual(n.offeredFeatures & VirtioFeature.version1, 0, "GET_FEATURES lacks VERSION_1")
        XCTAssertNotEqual(n.offeredFeatures & VirtioFeature.vhostUserProtocolFeatures, 0)
        XCTAssertNotEqual(n.offeredFeatures & VirtioFeature.vhostLogAll, 0, "GET_FEATURES lacks VHOST_F_LOG_ALL")
        XCTAssertEqual(n.ackedFeatures, wanted)
        XCTAssertTrue(fe.protocolFeaturesNegotiated)
        for bit in [VhostUserProtocolFeature.mq, VhostUserProtocolFeature.logShmfd, VhostUserProtocolFeature.replyAck] {
            XCTAssertNotEqual(n.ackedProtocolFeatures & bit, 0, "protocol feature \(VhostUserProtocolFeature.describe(bit)) not agreed")
        }
        XCTAssertGreaterThanOrEqual(n.queueCount ?? 0, 1)

        // 2. Two RAM regions with a gap; rings live in the high one, buffers in the low one.
        let low = try GuestRAM(baseGPA: 0, size: 4 << 20, name: "fe-low")
        let high = try GuestRAM(baseGPA: 8 << 20, size: 4 << 20, name: "fe-high")
        let ram = [low, high]
        try fe.setMemTable(ram)
        let placed = try RingPlacement.place(rings: 2, size: 256, in: high, ringAlignment: 4096)
        // A driver resuming at `base` has used.idx == avail.idx == base in memory; DPDK reads
        // used.idx and would override the base if it disagreed.
        let bases: [UInt16] = [3, 7]
        for (ring, base) in zip(placed, bases) {
            try high.store(base, at: ring.usedIdxGPA)
            try high.store(base, at: ring.availIdxGPA)
        }
        for (ring, base) in zip(placed, bases) { try fe.setupVring(ring, base: base) }
        XCTAssertNotNil(fe.kickFD(ring: 0))
        XCTAssertNotEqual(fe.callFD(ring: 1), fe.callFD(ring: 0))

        // 3. Logging on: one guest-TX frame on ring 1 must dirty ring 1's used ring, not the buffer.
        let log = try fe.enableLogging()
        XCTAssertEqual(log.size, DirtyLogBuffer.requiredSize(ramEndGPA: 12 << 20))
        print("SET_LOG_BASE reply: \(fe.lastLogBaseReply.map { "\($0.payload.count)-byte payload" } ?? "none")")
        let tx = placed[1]
        try sendFrame(on: tx, slot: UInt32(bases[1]), descriptor: 0, bufferGPA: 0x10000, ram: ram)
        try waitUsedIdx(tx, equals: bases[1] &+ 1, ram: high, pmd: pmd)
        XCTAssertGreaterThan(try fe.waitForCall(ring: 1, timeout: .seconds(5)), 0, "no call after the used update")
        let dirty = log.dirtyPages()
        print("dirty pages after one TX frame with logging on: \(dirty.map { "0x" + String($0, radix: 16) })")
        XCTAssertTrue(log.isDirty(gpa: tx.usedIdxGPA, length: 2), "used.idx write not logged")
        XCTAssertTrue(log.isDirty(gpa: tx.usedEntryGPA(UInt32(bases[1])), length: 8), "used element write not logged")
        XCTAssertFalse(log.isDirty(gpa: 0x10000), "a TX buffer (read by the device) was logged")

        // 4. Logging off (and a barrier, so DPDK has applied it): another frame dirties nothing.
        try fe.disableLogging(waitForBackend: true)
        log.clearLog()
        try sendFrame(on: tx, slot: UInt32(bases[1]) + 1, descriptor: 1, bufferGPA: 0x11000, ram: ram)
        try waitUsedIdx(tx, equals: bases[1] &+ 2, ram: high, pmd: pmd)
        XCTAssertEqual(log.dirtyPages(), [], "backend still logging after LOG_ALL was cleared")

        // 5. GET_VRING_BASE: ring 0 saw no traffic and answers its base; ring 1 moved on by two.
        XCTAssertEqual(try fe.getVringBase(index: 0), UInt32(bases[0]))
        XCTAssertEqual(try fe.getVringBase(index: 1), UInt32(bases[1]) + 2)
        XCTAssertTrue(pmd.isRunning, "testpmd exited")
    }

    /// Puts one 60-byte frame behind a 12-byte virtio-net header in one descriptor and publishes it.
    private func sendFrame(on ring: PlacedRing, slot: UInt32, descriptor: UInt16, bufferGPA: UInt64, ram: [GuestRAM]) throws {
        var frame = [UInt8](repeating: 0, count: 12)                  // virtio_net_hdr_v1, all zero
        frame += [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]
        frame += [UInt8](repeating: 0xab, count: 60 - 14)
        try ram.write(frame, at: bufferGPA)
        guard let rings = ram.region(containing: ring.descGPA) else { throw FrontendError.unmappedAddress(gpa: ring.descGPA, length: 1) }
        let d = ring.descGPA(UInt32(descriptor))
        try rings.store(bufferGPA, at: d)
        try rings.store(UInt32(frame.count), at: d + 8)
        try rings.store(UInt16(0), at: d + 12)                        // flags: device-readable, no next
        try rings.store(UInt16(0), at: d + 14)
        try rings.store(descriptor, at: ring.availEntryGPA(slot))
        try rings.storeRelease(UInt16(truncatingIfNeeded: slot &+ 1), at: ring.availIdxGPA)
    }

    private func waitUsedIdx(_ ring: PlacedRing, equals want: UInt16, ram: GuestRAM, pmd: FrontendTestPMD) throws {
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline {
            if try ram.loadAcquire(UInt16.self, at: ring.usedIdxGPA) == want { return }
            usleep(1000)
        }
        XCTFail("used.idx of ring \(ring.index) is \(try ram.loadAcquire(UInt16.self, at: ring.usedIdxGPA)), expected \(want)\n\(pmd.logTail())")
    }
}
