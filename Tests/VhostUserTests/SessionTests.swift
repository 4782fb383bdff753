import Platform
import XCTest
@testable import VhostUser

final class SessionTests: XCTestCase {
    let ramSize: UInt64 = 1 << 20

    /// A driver with SET_OWNER, features and a 1 MiB memory table at gpa 0.
    func ready(queuePairs: Int = 2) throws -> SessionDriver {
        let d = SessionDriver(queuePairs: queuePairs)
        try d.negotiate()
        try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: ramSize)]), fds: [memfd(Int(ramSize))])
        return d
    }

    func ringAddress(_ index: UInt32, desc: UInt64 = 0x1000, avail: UInt64 = 0x2000, used: UInt64 = 0x3000, flags: UInt32 = 0, log: UInt64 = 0) -> VhostUserPayload {
        .vringAddress(VringAddress(index: index, flags: flags, descUserAddr: testUserBase + desc, usedUserAddr: testUserBase + used,
                                   availUserAddr: testUserBase + avail, logGuestAddr: log))
    }

    func startRing(_ d: SessionDriver, _ i: UInt32, size: UInt32 = 256) throws {
        try d.send(.setVringNum, .vringState(VringState(index: i, num: size)))
        try d.send(.setVringBase, .vringState(VringState(index: i, num: 0)))
        try d.send(.setVringAddr, ringAddress(i, desc: 0x10000 * UInt64(i + 1), avail: 0x10000 * UInt64(i + 1) + 0x4000, used: 0x10000 * UInt64(i + 1) + 0x8000))
        try d.send(.setVringKick, .vringFile(index: i, hasFD: true), fds: [EventFD.make().take()])
        try d.send(.setVringCall, .vringFile(index: i, hasFD: true), fds: [EventFD.make().take()])
    }

    // MARK: negotiation

    func testGetFeaturesOffersTheConfiguredSet() throws {
        let d = SessionDriver()
        let f = d.u64(try d.send(.getFeatures))
        XCTAssertEqual(f, SessionDriver.offered, "the session offers what its port configured, nothing of its own choosing")
    }

    func testSetFeaturesRejectsBitsNotOffered() throws {
        let d = SessionDriver()
        assertRejected(.semantics, field: "features") { try d.send(.setFeatures, .u64(1 << 34)) }
        try d.send(.setFeatures, .u64(1 << 32))
        XCTAssertEqual(d.session.ackedFeatures, 1 << 32)
    }

    func testProtocolFeatures() throws {
        let d = SessionDriver()
        let offered = d.u64(try d.send(.getProtocolFeatures))!
        for bit in [VhostUserProtocolFeature.mq, .logShmfdBit, .rarpBit, .replyAckBit, .netMTUBit, .configureMemSlotsBit, .resetDeviceBit, .statusBit] {
            XCTAssertNotEqual(offered & bit, 0)
        }
        assertRejected(.semantics, field: "features") { try d.send(.setProtocolFeatures, .u64(VhostUserProtocolFeature.config)) }
        try d.send(.setProtocolFeatures, .u64(offered))
        XCTAssertEqual(d.session.ackedProtocolFeatures, offered)
    }

    func testGetQueueNumIsGatedOnMQAndAnswersPairs() throws {
        let d = SessionDriver(queuePairs: 4)
        assertRejected(.features) { try d.send(.getQueueNum) }
        // QEMU asks for the queue count before SET_FEATURES: only protocol features are needed.
        try d.send(.setProtocolFeatures, .u64(VhostUserProtocolFeature.mq))
        XCTAssertEqual(d.u64(try d.send(.getQueueNum)), 4)
    }

    func testNeedReplyAcksSuccessAndDecline() throws {
        let d = SessionDriver()
        try d.negotiate()
        XCTAssertNil(try d.send(.setOwner), "no reply without need_reply")
        XCTAssertEqual(d.u64(try d.send(.setOwner, needReply: true)), 0)
        // A well-formed request the port declines gets a failure reply when one was asked for.
        XCTAssertEqual(d.u64(try d.send(.netSetMTU, .u64(10), needReply: true)), 1)
        XCTAssertNil(try d.send(.netSetMTU, .u64(10)))
        XCTAssertEqual(d.u64(try d.send(.netSetMTU, .u64(9000), needReply: true)), 0)
        XCTAssertEqual(d.session.mtu, 9000)
        XCTAssertEqual(d.u64(try d.send(.sendRARP, .u64(0x0605_0403_0201), needReply: true)), 1, "no device: RARP declined")
    }

    func testRequestsGatedOnProtocolFeatures() throws {
        let d = SessionDriver()
        assertRejected(.features) { try d.send(.setLogBase, .log(LogDescription(size: 4096, offset: 0)), fds: [memfd(4096)]) }
        assertRejected(.features) { try d.send(.getMaxMemSlots) }
        assertRejected(.features) { try d.send(.setStatus, .u64(1)) }
        assertRejected(.features) { try d.send(.sendRARP, .u64(0)) }
        assertRejected(.features) { try d.send(.resetDevice) }
        assertRejected(.features) { try d.send(.setVringEnable, .vringState(VringState(index: 0, num: 1))) }
    }

    // MARK: memory

    func testMemTableAndTranslation() throws {
        let d = SessionDriver()
        try d.negotiate()
        try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 1 << 20), region(gpa: 1 << 24, size: 1 << 20)]),
                   fds: [memfd(1 << 20), memfd(1 << 20)])
        let t = d.session.memory.current()
        XCTAssertEqual(t.regions.count, 2)
        XCTAssertNotNil(t.hostPointer(gpa: 0, length: 1 << 20))
        XCTAssertNil(t.hostPointer(gpa: 1, length: 1 << 20), "runs past the end of the region")
        XCTAssertNil(t.hostPointer(gpa: (1 << 20) - 8, length: 16), "spans the gap between regions")
        XCTAssertNotNil(t.hostPointer(gpa: (1 << 24) + (1 << 20) - 1, length: 1))
        XCTAssertNil(t.hostPointer(gpa: 1 << 23, length: 1), "hole")
        XCTAssertNil(t.hostPointer(gpa: UInt64.max - 2, length: 8), "wraps")
        XCTAssertEqual(t.guestPhysAddr(userAddr: testUserBase + (1 << 24) + 5, length: 1), (1 << 24) + 5)
        XCTAssertNil(t.guestPhysAddr(userAddr: testUserBase - 1, length: 1))
        XCTAssertEqual(t.guestPhysEnd, (1 << 24) + (1 << 20))
        // Bytes written through one translation are seen through the other.
        t.hostPointer(gpa: 0x100, length: 4)!.storeBytes(of: 0xdead_beef as UInt32, as: UInt32.self)
        XCTAssertEqual(t.hostPointer(userAddr: testUserBase + 0x100, length: 4)!.load(as: UInt32.self), 0xdead_beef)
    }

    func testMemTableGenerationAdvances() throws {
        let d = try ready()
        let g = d.session.memory.generation
        try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: ramSize)]), fds: [memfd(Int(ramSize))])
        XCTAssertEqual(d.session.memory.generation, g + 1)
    }

    func testOverlappingRegionsRejected() throws {
        let d = SessionDriver()
        try d.negotiate()
        assertRejected(.semantics, field: "guest_phys_addr") {
            try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 0x20000), region(gpa: 0x10000, size: 0x20000, uva: 0x9000_0000)]),
                       fds: [memfd(0x20000), memfd(0x20000)])
        }
        assertRejected(.semantics, field: "userspace_addr") {
            try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 0x20000, uva: 0x5000_0000), region(gpa: 0x100000, size: 0x20000, uva: 0x5001_0000)]),
                       fds: [memfd(0x20000), memfd(0x20000)])
        }
    }

    func testZeroSizeAndOverflowingRegionsRejected() throws {
        let d = SessionDriver()
        try d.negotiate()
        assertRejected(.semantics, field: "memory_size") {
            try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 0)]), fds: [memfd(4096)])
        }
        assertRejected(.semantics, field: "guest_phys_addr") {
            try d.send(.setMemTable, .memoryTable([region(gpa: UInt64.max - 10, size: 4096, uva: 0)]), fds: [memfd(4096)])
        }
    }

    func testAddMemRegAcceptsExactDuplicateAndRejectsPartialOverlap() throws {
        let d = SessionDriver()
        try d.negotiate()
        let r = region(gpa: 0x100000, size: 0x10000)
        try d.send(.addMemReg, .memoryRegion(r), fds: [memfd(0x10000)])
        // QEMU 7.2 sends ADD_MEM_REG once per queue pair.
        try d.send(.addMemReg, .memoryRegion(r), fds: [memfd(0x10000)])
        XCTAssertEqual(d.session.memory.current().regions.count, 1)
        assertRejected(.semantics, field: "guest_phys_addr") {
            try d.send(.addMemReg, .memoryRegion(region(gpa: 0x108000, size: 0x10000)), fds: [memfd(0x10000)])
        }
        try d.send(.addMemReg, .memoryRegion(region(gpa: 0x200000, size: 0x10000)), fds: [memfd(0x10000)])
        XCTAssertEqual(d.u64(try d.send(.getMaxMemSlots)), 32)
        XCTAssertEqual(d.session.memory.current().regions.count, 2)
        try d.send(.remMemReg, .memoryRegion(r), fds: [memfd(0x10000)])
        XCTAssertEqual(d.session.memory.current().regions.map(\.guestPhysAddr), [0x200000])
        XCTAssertEqual(d.u64(try d.send(.remMemReg, .memoryRegion(r), needReply: true)), 1, "removing an unknown region is declined")
    }

    func testRegionThatCannotBeMappedRejected() throws {
        let d = SessionDriver()
        try d.negotiate()
        // An fd that cannot be mapped (an eventfd) is a bad region, not a crash.
        assertRejected(.semantics, field: "fd") {
            try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 4096)]), fds: [EventFD.make().take()])
        }
    }

    func testRegionLargerThanItsFileRejected() throws {
        // Found by Fuzz/session-engine: a 64 KiB region over a one-page memfd was accepted, and the
        // device's first read of a ring beyond that page killed the daemon with SIGBUS.
        let d = SessionDriver()
        try d.negotiate()
        assertRejected(.semantics, field: "fd") {
            try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 0x10000)]), fds: [memfd(4096)])
        }
        let e = SessionDriver()
        try e.negotiate()
        assertRejected(.semantics, field: "fd") {
            try e.send(.addMemReg, .memoryRegion(region(gpa: 0, size: 0x10000, offset: 0x1000)), fds: [memfd(0x10000)])
        }
        XCTAssertTrue(e.session.memory.current().regions.isEmpty, "nothing was installed")
        // The same region over a file that backs it is accepted (the check is not overreaching),
        // also with an offset that is not page aligned (DPDK sends such) when the file covers it.
        try e.send(.addMemReg, .memoryRegion(region(gpa: 0, size: 0x10000, offset: 0x10)), fds: [memfd(0x10010)])
        XCTAssertEqual(e.session.memory.current().regions.count, 1)
    }

    func testLogLargerThanItsFileRejected() throws {
        let d = try ready()
        assertRejected(.semantics, field: "fd") {
            try d.send(.setLogBase, .log(LogDescription(size: 8192, offset: 0)), fds: [memfd(4096)])
        }
        XCTAssertNil(d.session.log)
    }

    // MARK: rings

    func testVringNumRules() throws {
        let d = try ready()
        assertRejected(.semantics, field: "num") { try d.send(.setVringNum, .vringState(VringState(index: 0, num: 100))) }
        assertRejected(.semantics, field: "num") { try d.send(.setVringNum, .vringState(VringState(index: 0, num: 65536))) }
        assertRejected(.semantics, field: "num") { try d.send(.setVringNum, .vringState(VringState(index: 0, num: 0))) }
        try d.send(.setVringNum, .vringState(VringState(index: 0, num: 32768)))
        XCTAssertEqual(d.session.vrings[0].size, 32768)
    }

    func testRingIndexBelowQueueCount() throws {
        let d = try ready(queuePairs: 2)
        assertRejected(.semantics, field: "index") { try d.send(.setVringNum, .vringState(VringState(index: 4, num: 256))) }
        assertRejected(.semantics, field: "index") { try d.send(.setVringCall, .vringFile(index: 4, hasFD: true), fds: [EventFD.make().take()]) }
        assertRejected(.semantics, field: "index") { try d.send(.getVringBase, .vringState(VringState(index: 200, num: 0))) }
        try d.send(.setVringNum, .vringState(VringState(index: 3, num: 256)))
    }

    func testVringAddrMustLieInGuestMemory() throws {
        let d = try ready()
        try d.send(.setVringNum, .vringState(VringState(index: 0, num: 256)))
        assertRejected(.semantics, field: "desc_user_addr") { try d.send(.setVringAddr, ringAddress(0, desc: ramSize)) }
        // The used ring (6 + 8*256 bytes) must fit wholly: starting 16 bytes before the end does not.
        assertRejected(.semantics, field: "used_user_addr") { try d.send(.setVringAddr, ringAddress(0, used: ramSize - 16)) }
        assertRejected(.semantics, field: "log_guest_addr") {
            try d.send(.setVringAddr, ringAddress(0, flags: VringAddress.logFlag, log: ramSize + 0x1000))
        }
        try d.send(.setVringAddr, ringAddress(0))
        XCTAssertEqual(d.session.vrings[0].usedGPA, 0x3000)
    }

    func testVringAddrAlignment() throws {
        let d = try ready()
        assertRejected(.semantics, field: "desc_user_addr") { try d.send(.setVringAddr, ringAddress(0, desc: 0x1008)) }
        assertRejected(.semantics, field: "avail_user_addr") { try d.send(.setVringAddr, ringAddress(0, avail: 0x2001)) }
        assertRejected(.semantics, field: "used_user_addr") { try d.send(.setVringAddr, ringAddress(0, used: 0x3002)) }
        assertRejected(.semantics, field: "flags") { try d.send(.setVringAddr, ringAddress(0, flags: 2)) }
    }

    func testVringAddrBeforeMemoryTableRejected() throws {
        let d = SessionDriver()
        try d.negotiate()
        assertRejected(.semantics, field: "desc_user_addr") { try d.send(.setVringAddr, ringAddress(0)) }
    }

    func testVringBaseIs16BitsForSplitRings() throws {
        let d = try ready()
        assertRejected(.semantics, field: "num") { try d.send(.setVringBase, .vringState(VringState(index: 0, num: 0x10000))) }
        try d.send(.setVringBase, .vringState(VringState(index: 0, num: 0xffff)))
    }

    func testRingStartsAndGetVringBaseStopsIt() throws {
        let d = try ready()
        try d.send(.setVringNum, .vringState(VringState(index: 1, num: 256)))
        try d.send(.setVringBase, .vringState(VringState(index: 1, num: 77)))
        try d.send(.setVringAddr, ringAddress(1))
        XCTAssertFalse(d.session.vrings[1].started)
        try d.send(.setVringKick, .vringFile(index: 1, hasFD: true), fds: [EventFD.make().take()])
        XCTAssertTrue(d.session.vrings[1].started)
        assertRejected(.semantics, field: "index") { try d.send(.setVringNum, .vringState(VringState(index: 1, num: 128))) }
        let reply = try d.send(.getVringBase, .vringState(VringState(index: 1, num: 0)))!
        XCTAssertEqual(reply.count, 8)
        reply.withUnsafeBytes {
            XCTAssertEqual(VhostUserCodec.readU32(UnsafeRawBufferPointer($0), at: 0), 1)
            XCTAssertEqual(VhostUserCodec.readU32(UnsafeRawBufferPointer($0), at: 4), 77)
        }
        XCTAssertFalse(d.session.vrings[1].started)
    }

    func testKickWithoutFDMeansPolling() throws {
        let d = try ready()
        try d.send(.setVringNum, .vringState(VringState(index: 0, num: 256)))
        try d.send(.setVringAddr, ringAddress(0))
        try d.send(.setVringKick, .vringFile(index: 0, hasFD: false))
        XCTAssertTrue(d.session.vrings[0].kickPolling)
        XCTAssertTrue(d.session.vrings[0].started)
        try d.send(.setVringCall, .vringFile(index: 0, hasFD: false))
        XCTAssertNil(d.session.vrings[0].call)
    }

    func testVringEnable() throws {
        let d = try ready()
        try d.send(.setVringEnable, .vringState(VringState(index: 2, num: 1)))
        XCTAssertTrue(d.session.vrings[2].enabled)
        assertRejected(.semantics, field: "num") { try d.send(.setVringEnable, .vringState(VringState(index: 2, num: 2))) }
    }

    func testWithoutProtocolFeaturesRingsStartEnabled() throws {
        let d = SessionDriver()
        try d.send(.setFeatures, .u64(1 << 32))
        XCTAssertTrue(d.session.vrings.allSatisfy(\.enabled))
    }

    func testRunningRingAddressesCannotMoveButLogFlagCan() throws {
        let d = try ready()
        try startRing(d, 0)
        let a = d.session.vrings[0].address!
        var logged = a
        logged.flags = VringAddress.logFlag
        logged.logGuestAddr = d.session.vrings[0].usedGPA
        try d.send(.setVringAddr, .vringAddress(logged))
        XCTAssertTrue(d.session.vrings[0].logging)
        var moved = a
        moved.descUserAddr += 0x1000
        assertRejected(.semantics, field: "index") { try d.send(.setVringAddr, .vringAddress(moved)) }
    }

    // MARK: log, status, reset

    func testLogBaseMustCoverGuestRAM() throws {
        let d = try ready()
        let needed = DirtyLog.bytesNeeded(guestPhysEnd: ramSize)
        XCTAssertEqual(needed, 32)
        assertRejected(.semantics, field: "mmap_size") {
            try d.send(.setLogBase, .log(LogDescription(size: needed - 1, offset: 0)), fds: [memfd(4096)])
        }
        let reply = try d.send(.setLogBase, .log(LogDescription(size: needed, offset: 0)), fds: [memfd(4096)])
        XCTAssertEqual(d.u64(reply), 0, "SET_LOG_BASE is always answered")
        XCTAssertEqual(d.session.log?.byteCount, Int(needed))
        try d.send(.setLogFD, fds: [EventFD.make().take()])
        XCTAssertNotNil(d.session.logFD)
    }

    func testLogAllToggles() throws {
        let d = try ready()
        XCTAssertFalse(d.session.logAllEnabled)
        try d.send(.setFeatures, .u64(d.session.ackedFeatures | VirtioFeatureBits.logAll))
        XCTAssertTrue(d.session.logAllEnabled)
        try d.send(.setFeatures, .u64(d.session.ackedFeatures & ~VirtioFeatureBits.logAll))
        XCTAssertFalse(d.session.logAllEnabled)
    }

    func testStatus() throws {
        let d = try ready()
        try d.send(.setStatus, .u64(0x0f))
        XCTAssertEqual(d.u64(try d.send(.getStatus)), 0x0f)
        assertRejected(.semantics, field: "status") { try d.send(.setStatus, .u64(0x100)) }
    }

    func testResetDeviceClearsRingsAndFeatures() throws {
        let d = try ready()
        try startRing(d, 0)
        try d.send(.resetDevice)
        XCTAssertFalse(d.session.vrings[0].started)
        XCTAssertEqual(d.session.vrings[0].size, 0)
        XCTAssertEqual(d.session.ackedFeatures, 0)
        XCTAssertTrue(d.session.memory.current().regions.isEmpty)
        XCTAssertNotEqual(d.session.ackedProtocolFeatures, 0, "protocol features belong to the connection")
    }

    func testBackendReqFD() throws {
        let d = try ready()
        try d.send(.setBackendReqFD, fds: [EventFD.make().take()])
        XCTAssertNotNil(d.session.backendRequestFD)
    }

    func testCloseReleasesEverything() throws {
        let d = try ready()
        try startRing(d, 0)
        try d.send(.setLogBase, .log(LogDescription(size: 4096, offset: 0)), fds: [memfd(4096)])
        d.session.close()
        XCTAssertTrue(d.session.memory.current().regions.isEmpty)
        XCTAssertNil(d.session.log)
        XCTAssertNil(d.session.vrings[0].kick)
        XCTAssertNil(d.session.vrings[0].call)
    }
}

extension UInt64 {
    static let logShmfdBit = VhostUserProtocolFeature.logShmfd
    static let rarpBit = VhostUserProtocolFeature.rarp
    static let replyAckBit = VhostUserProtocolFeature.replyAck
    static let netMTUBit = VhostUserProtocolFeature.netMTU
    static let configureMemSlotsBit = VhostUserProtocolFeature.configureMemSlots
    static let resetDeviceBit = VhostUserProtocolFeature.resetDevice
    static let statusBit = VhostUserProtocolFeature.status
}
