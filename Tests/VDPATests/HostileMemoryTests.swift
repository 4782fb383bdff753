#if canImport(Glibc)
import DeviceFramework
import Glibc
#endif
import Foundation
import Platform
import VhostUser
import VhostUserFrontend
import XCTest
@testable import VDPA

/// Hostile memory tables, logs and ring fds over a real socket (issue classes 1 to 4): each is
/// refused with an error naming what was wrong, the daemon keeps running, the next frontend on
/// the port works and the other port is undisturbed.
extension HostileFrontendTests {
    /// Sends one request that must close the connection with an error containing `expect`.
    func assertRefused(_ r: VhostUserRequest, _ payload: VhostUserPayload, fds: [Int32], expect: String,
                       file: StaticString = #filePath, line: UInt = #line) throws {
        let other = try RawFrontend(path: dir + "/vdpa1.sock")
        try other.request(.getFeatures)
        XCTAssertNotNil(try other.reply(), file: file, line: line)
        waitFor("port to listen") { port.status.connection == "listening" }
        let f = try negotiated()
        try f.request(r, payload, fds: fds)
        XCTAssertTrue(f.isClosedByPeer(), "backend kept a connection that sent \(r.name) with \(payload)", file: file, line: line)
        waitFor("disconnect") { port.status.connection == "listening" }
        let err = port.status.lastError ?? ""
        XCTAssertTrue(err.contains(expect), "error '\(err)' should name '\(expect)'", file: file, line: line)
        XCTAssertTrue(port.status.memoryRegions.isEmpty, file: file, line: line)
        try other.request(.getFeatures)
        XCTAssertNotNil(try other.reply(), "the other port's frontend keeps its connection", file: file, line: line)
        try assertPortWorks(file: file, line: line)
    }

    func memTable(_ d: MemoryRegionDescription, fd: Int32, expect: String,
                  file: StaticString = #filePath, line: UInt = #line) throws {
        try assertRefused(.setMemTable, .memoryTable([d]), fds: [fd], expect: expect, file: file, line: line)
    }

    /// Class 1: an mmap offset near the top of the file offset space once trapped in the
    /// rounding arithmetic and killed the whole daemon.
    func testCraftedRegionOffsetsAreRefusedNotATrap() throws {
        let m = try makeMemfd(name: "crafted", size: 0x10000)
        // This one trapped: offset + size within a page of Int.max, then rounded up to a page.
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000_0000,
                                             mmapOffset: UInt64(Int.max) - 0x1000 - 100), fd: m.raw,
                     expect: "SET_MEM_TABLE: fd: region at guest 0x0 (mmap_offset 9223372036854771611, size 4096): offset 9223372036854771611 + length 4096 overflows")
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000_0000, mmapOffset: UInt64(Int.max) - 100), fd: m.raw,
                     expect: "overflows")
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000_0000, mmapOffset: UInt64.max - 0x800), fd: m.raw,
                     expect: "overflows")
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000_0000, mmapOffset: 1 << 62), fd: m.raw,
                     expect: "overflows")
    }

    /// Class 2: a region or log beyond the end of its file is refused, naming the file's size.
    func testRegionAndLogBeyondTheFileAreRefused() throws {
        let m = try makeMemfd(name: "short", size: 0x10000)
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x20000, userAddr: 0x1000_0000, mmapOffset: 0), fd: m.raw,
                     expect: "beyond the end of the file (65536 bytes)")
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x10000, userAddr: 0x1000_0000, mmapOffset: 0x1000), fd: m.raw,
                     expect: "beyond the end of the file")
        let pipeFDs = try makePipe()
        try memTable(MemoryRegionDescription(guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000_0000, mmapOffset: 0), fd: pipeFDs.0.raw,
                     expect: "not a regular file")

        let log = try makeMemfd(name: "short-log", size: 4096)
        try withMemory(expect: "SET_LOG_BASE: fd: log of 8192 bytes at offset 0: [0, +8192) lies beyond the end of the file (4096 bytes)") { f in
            try f.request(.setLogBase, .log(LogDescription(size: 8192, offset: 0)), fds: [log.raw])
        }
    }

    /// Class 1: the log is marked in 64-bit atomics, so its offset must be 8-byte aligned.
    func testLogOffsetMustBe8ByteAligned() throws {
        let log = try makeMemfd(name: "log", size: 8192)
        try withMemory(expect: "SET_LOG_BASE: mmap_offset: 4 is not 8-byte aligned") { f in
            try f.request(.setLogBase, .log(LogDescription(size: 64, offset: 4)), fds: [log.raw])
        }
    }

    /// Class 1: a session may map at most BackendConfig.defaultMaxMappedBytes (1 TiB) of the
    /// frontend's files; sparse files make the attempt cheap for a frontend.
    func testMappedBytesAreCappedPerSession() throws {
        let big = UInt64(600) << 30
        let a = try makeMemfd(name: "sparse-a", size: Int(big)), b = try makeMemfd(name: "sparse-b", size: Int(big))
        try assertRefused(.setMemTable, .memoryTable([
            MemoryRegionDescription(guestPhysAddr: 0, size: big, userAddr: 0x1000_0000_0000, mmapOffset: 0),
            MemoryRegionDescription(guestPhysAddr: big, size: big, userAddr: 0x2000_0000_0000, mmapOffset: 0),
        ]), fds: [a.raw, b.raw], expect: "more than the limit of \(BackendConfig.defaultMaxMappedBytes)")
    }

    /// Class 1: a huge sparse log is refused from its announced size, before it is mapped.
    func testHugeLogIsRefusedBeforeMapping() throws {
        let name = "huge-log-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let log = try makeMemfd(name: name, size: 2 << 40)
        try withMemory(expect: "SET_LOG_BASE: memory_size: the session would map more than the limit") { f in
            try f.request(.setLogBase, .log(LogDescription(size: 2 << 40, offset: 0)), fds: [log.raw])
        }
        XCTAssertEqual(try ProcessMaps.sizes(ofMemfdNamed: name), [], "the log must not have been mapped")
    }

    /// Class 1: only the pages that hold a region are mapped, not the file from its start.
    func testOnlyTheRegionsWindowIsMapped() throws {
        let name = "window-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let m = try makeMemfd(name: name, size: (1 << 30) + 0x20000)
        let f = try negotiated()
        try f.request(.setMemTable, .memoryTable([MemoryRegionDescription(guestPhysAddr: 0, size: 0x10000, userAddr: 0x1000_0000,
                                                                          mmapOffset: (1 << 30) + 0x80)]),
                      fds: [m.raw], needReply: true)
        XCTAssertEqual(try f.reply()?.1, [0, 0, 0, 0, 0, 0, 0, 0], port.status.lastError ?? "")
        let sizes = try ProcessMaps.sizes(ofMemfdNamed: name)
        XCTAssertEqual(sizes, [0x11000], "one mapping of the region's pages (offset rounded down, end up): \(sizes)")
        _ = consume f
        waitFor("disconnect") { port.status.connection == "listening" }
    }

    /// Class 3: kick, call and error fds must be eventfds.
    func testRingFDsMustBeEventFDs() throws {
        let p = try makePipe()
        try withMemory(expect: "SET_VRING_KICK: fd: ring 0: not an eventfd (it is pipe:") { f in
            try f.request(.setVringKick, .vringFile(index: 0, hasFD: true), fds: [p.0.raw])
        }
        var sv: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv), 0)
        let s0 = FileDescriptor(owning: sv[0]), s1 = FileDescriptor(owning: sv[1])
        try withMemory(expect: "SET_VRING_CALL: fd: ring 1: not an eventfd (it is socket:") { f in
            try f.request(.setVringCall, .vringFile(index: 1, hasFD: true), fds: [s0.raw])
        }
        // A semaphore-mode eventfd: a level-triggered watch on it never goes quiet.
        let sem = try EventFD.make(semaphore: true)
        try withMemory(expect: "SET_VRING_KICK: fd: ring 0: not an eventfd (it is a semaphore-mode eventfd)") { f in
            try f.request(.setVringKick, .vringFile(index: 0, hasFD: true), fds: [sem.raw])
        }
        let m = try makeMemfd(name: "not-an-eventfd", size: 4096)
        try withMemory(expect: "SET_VRING_ERR: fd: ring 0: not an eventfd") { f in
            try f.request(.setVringErr, .vringFile(index: 0, hasFD: true), fds: [m.raw])
        }
        _ = consume s1
    }

    /// Class 3: an eventfd the frontend made blocking is made non-blocking when it arrives.
    func testEventFDsAreMadeNonBlocking() throws {
        let e = try EventFD.make(nonBlocking: false)
        XCTAssertEqual(fcntl(e.raw, F_GETFL) & O_NONBLOCK, 0)
        let f = try negotiated()
        try f.request(.setVringCall, .vringFile(index: 0, hasFD: true), fds: [e.raw], needReply: true)
        XCTAssertEqual(try f.reply()?.1, [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertNotEqual(fcntl(e.raw, F_GETFL) & O_NONBLOCK, 0, "the daemon must never block on a frontend's eventfd")
    }

    /// Class 4: guest memory may not reach the daemon's reserved IOVA range (mediated rings).
    func testRegionsInTheReservedIOVARangeAreRefused() throws {
        let m = try makeMemfd(name: "high", size: 0x20000)
        try memTable(MemoryRegionDescription(guestPhysAddr: reservedIOVABase - 0x10000, size: 0x20000, userAddr: 0x1000_0000, mmapOffset: 0),
                     fd: m.raw, expect: "reaches the daemon's reserved IOVA range")
        try memTable(MemoryRegionDescription(guestPhysAddr: reservedIOVABase, size: 0x1000, userAddr: 0x1000_0000, mmapOffset: 0),
                     fd: m.raw, expect: "reaches the daemon's reserved IOVA range")
    }

    // MARK: helpers

    /// Runs `body` on a negotiated frontend with one 128 KiB region, then expects the connection
    /// closed with an error containing `expect`, and the port working afterwards.
    func withMemory(expect: String, file: StaticString = #filePath, line: UInt = #line, _ body: (borrowing RawFrontend) throws -> Void) throws {
        waitFor("port to listen") { port.status.connection == "listening" }
        let ram = try makeMemfd(name: "ram", size: 0x20000)
        let f = try negotiated()
        try f.request(.setMemTable, .memoryTable([region(0, 0x20000, 0x1000_0000)]), fds: [ram.raw], needReply: true)
        XCTAssertNotNil(try f.reply(), file: file, line: line)
        try body(f)
        XCTAssertTrue(f.isClosedByPeer(), "backend kept the connection", file: file, line: line)
        waitFor("disconnect") { port.status.connection == "listening" }
        let err = port.status.lastError ?? ""
        XCTAssertTrue(err.contains(expect), "error '\(err)' should name '\(expect)'", file: file, line: line)
        try assertPortWorks(file: file, line: line)
    }

    func makePipe() throws -> (SharedFD, SharedFD) {
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { throw SystemError("pipe", errno: errno) }
        return (SharedFD(FileDescriptor(owning: p[0])), SharedFD(FileDescriptor(owning: p[1])))
    }
}
