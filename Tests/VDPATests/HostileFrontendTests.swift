#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import Platform
import VhostUser
import XCTest
@testable import VDPA

/// A frontend that speaks raw bytes, to send what a well-behaved one never would.
struct RawFrontend: ~Copyable {
    let fd: FileDescriptor

    init(path: String) throws {
        let fd = try UnixSocket.connect(path: path)
        try UnixSocket.setReceiveTimeout(fd, seconds: 5)
        self.fd = fd
    }

    func send(_ bytes: [UInt8], fds: [Int32] = []) throws {
        try bytes.withUnsafeBytes { try UnixSocket.send(fd, bytes: $0, fds: fds) }
    }

    func request(_ r: VhostUserRequest, _ payload: VhostUserPayload = .none, fds: [Int32] = [], needReply: Bool = false) throws {
        try send(VhostUserCodec.encodeRequest(r, needReply: needReply, payload: payload), fds: fds)
    }

    /// Reads one reply; nil when the backend closed the connection.
    func reply() throws -> (VhostUserHeader, [UInt8])? {
        var fds = ReceivedFDs()
        var header = [UInt8](repeating: 0, count: 12)
        do {
            try header.withUnsafeMutableBytes { try UnixSocket.receiveExactly(fd, into: $0, fds: &fds) }
        } catch SocketError.closed {
            return nil
        }
        guard let h = header.withUnsafeBytes({ VhostUserCodec.decodeReplyHeader($0) }) else { throw SocketError.closed(partial: 12) }
        var body = [UInt8](repeating: 0, count: Int(h.size))
        if h.size > 0 { try body.withUnsafeMutableBytes { try UnixSocket.receiveExactly(fd, into: $0, fds: &fds) } }
        return (h, body)
    }

    /// True once the backend has closed its end.
    func isClosedByPeer() -> Bool {
        var pfd = pollfd(fd: fd.raw, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 3000) == 1 else { return false }
        var b: UInt8 = 0
        let n = recv(fd.raw, &b, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        // A peer that closes with our bytes still unread resets the connection instead of EOF.
        return n == 0 || (n < 0 && errno == ECONNRESET)
    }
}

func openFDCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

func openFDs() -> String {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return names.sorted { Int($0)! < Int($1)! }.map { n in
        "\(n)=\((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + n)) ?? "?")"
    }.joined(separator: " ")
}

final class HostileFrontendTests: XCTestCase {
    var dir = ""
    var daemon: Daemon!
    var socketPath: String { dir + "/vdpa0.sock" }

    override func setUpWithError() throws {
        dir = "/tmp/vdpa-hostile-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        daemon = try Daemon(specs: [PortSpec(id: "vdpa0", socketPath: dir + "/vdpa0.sock"),
                                    PortSpec(id: "vdpa1", socketPath: dir + "/vdpa1.sock")],
                            controlPath: dir + "/control.sock", logger: logger)
        try daemon.start()
        // Each port's thread sets up its epoll when it starts: a round trip on every port makes
        // sure all of them run, so that fd counts taken by the tests include their fds.
        for path in [dir + "/vdpa0.sock", dir + "/vdpa1.sock"] {
            let f = try RawFrontend(path: path)
            try f.request(.getFeatures)
            _ = try f.reply()
        }
    }

    override func tearDown() {
        daemon?.stop()
        daemon = nil  // XCTest keeps test cases alive: drop the daemon so its fds close now
        try? FileManager.default.removeItem(atPath: dir)
    }

    var port: VDPA.Port { daemon.ports[0] }

    func waitFor(_ what: String, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(5)
        while !condition() && Date() < deadline { usleep(10_000) }
        XCTAssertTrue(condition(), "timed out waiting for \(what)")
    }

    /// A well-formed frontend negotiates on the port: the port is usable.
    func assertPortWorks(file: StaticString = #filePath, line: UInt = #line) throws {
        waitFor("port to listen again") { port.status.connection == "listening" }
        let f = try RawFrontend(path: socketPath)
        try f.request(.getFeatures)
        let r = try XCTUnwrap(try f.reply(), "no reply to GET_FEATURES", file: file, line: line)
        XCTAssertEqual(r.0.request, VhostUserRequest.getFeatures.rawValue, file: file, line: line)
        try f.request(.setOwner, needReply: false)
        try f.request(.getProtocolFeatures)
        XCTAssertNotNil(try f.reply(), file: file, line: line)
        _ = consume f
        waitFor("the well-formed frontend's disconnect") { port.status.connection == "listening" }
    }

    /// Sends `bytes`, expects the backend to close the connection and record an error naming `expect`.
    func assertClosed(_ bytes: [UInt8], fds: [Int32] = [], expect: String, file: StaticString = #filePath, line: UInt = #line) throws {
        waitFor("port to listen") { port.status.connection == "listening" }
        let f = try RawFrontend(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        try f.send(bytes, fds: fds)
        XCTAssertTrue(f.isClosedByPeer(), "backend kept a connection that sent bad input", file: file, line: line)
        waitFor("disconnect") { port.status.connection == "listening" }
        let err = port.status.lastError ?? ""
        XCTAssertTrue(err.contains(expect), "error '\(err)' should name '\(expect)'", file: file, line: line)
        try assertPortWorks(file: file, line: line)
    }

    func testGarbage() throws {
        try assertClosed(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), expect: "request")
        try assertClosed([UInt8](repeating: 0xff, count: 64), expect: "request")
    }

    func testTruncatedHeaderThenClose() throws {
        let f = try RawFrontend(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        try f.send([1, 0, 0, 0, 1])
        _ = consume f
        try assertPortWorks()
    }

    func testBodyShorterThanHeaderSays() throws {
        var bytes = VhostUserHeader(request: VhostUserRequest.setFeatures.rawValue, flags: 1, size: 8).encode()
        bytes += [1, 2, 3]
        let f = try RawFrontend(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        try f.send(bytes)
        _ = consume f  // closes mid-body
        waitFor("disconnect") { port.status.connection == "listening" }
        XCTAssertTrue(port.status.lastError?.contains("SET_FEATURES") ?? false, port.status.lastError ?? "no error")
        try assertPortWorks()
    }

    func testOversizeBody() throws {
        try assertClosed(VhostUserHeader(request: VhostUserRequest.setMemTable.rawValue, flags: 1, size: 1 << 20).encode(), expect: "size")
    }

    func testWrongFDCountsAndNoLeak() throws {
        // Warm up so lazily opened fds are not counted.
        try assertPortWorks()
        let before = openFDCount()
        let beforeList = openFDs()
        let e1 = try EventFD.make(), e2 = try EventFD.make()
        try assertClosed(VhostUserCodec.encodeRequest(.setFeatures, payload: .u64(1 << 32)), fds: [e1.raw, e2.raw], expect: "fds")
        try assertClosed(VhostUserCodec.encodeRequest(.setVringCall, payload: .vringFile(index: 0, hasFD: true)), expect: "fds")
        _ = consume e1
        _ = consume e2
        waitFor("fds released") { openFDCount() <= before }
        XCTAssertLessThanOrEqual(openFDCount(), before, "the daemon kept fds from rejected messages: \(Set(openFDs().split(separator: " ")).subtracting(beforeList.split(separator: " ")))")
    }

    func testTooManyFDsIsATruncationErrorNotALeak() throws {
        try assertPortWorks()
        let before = openFDCount()
        let beforeList = openFDs()
        var raws: [Int32] = []
        defer { for r in raws { close(r) } }
        for _ in 0..<40 { raws.append(try EventFD.make().take()) }
        try assertClosed(VhostUserCodec.encodeRequest(.setOwner, payload: .none), fds: raws, expect: "truncated")
        for r in raws { close(r) }
        raws = []
        waitFor("fds released") { openFDCount() <= before }
        let after = openFDs()
        XCTAssertLessThanOrEqual(openFDCount(), before, "new: \(Set(after.split(separator: " ")).subtracting(beforeList.split(separator: " ")))")
    }

    func negotiated() throws -> RawFrontend {
        let f = try RawFrontend(path: socketPath)
        try f.request(.setOwner)
        try f.request(.setProtocolFeatures, .u64(BackendConfig.offeredProtocolFeatures))
        try f.request(.setFeatures, .u64(1 << 32 | 1 << 30))
        return f
    }

    func testOverlappingRegions() throws {
        let a = try makeMemfd(name: "a", size: 0x20000), b = try makeMemfd(name: "b", size: 0x20000)
        let f = try negotiated()
        try f.request(.setMemTable, .memoryTable([region(0, 0x20000, 0x1000_0000), region(0x10000, 0x20000, 0x2000_0000)]), fds: [a.raw, b.raw])
        XCTAssertTrue(f.isClosedByPeer())
        waitFor("disconnect") { port.status.connection == "listening" }
        XCTAssertTrue(port.status.lastError?.contains("SET_MEM_TABLE: regions[1].guest_phys_addr") ?? false, port.status.lastError ?? "")
        XCTAssertTrue(port.status.memoryRegions.isEmpty, "a closed connection leaves no memory mapped")
        try assertPortWorks()
    }

    func testRingOutsideMemory() throws {
        let a = try makeMemfd(name: "a", size: 0x20000)
        let f = try negotiated()
        try f.request(.setMemTable, .memoryTable([region(0, 0x20000, 0x1000_0000)]), fds: [a.raw])
        try f.request(.setVringNum, .vringState(VringState(index: 0, num: 256)))
        try f.request(.setVringAddr, .vringAddress(VringAddress(index: 0, flags: 0, descUserAddr: 0x1000_0000,
                                                                  usedUserAddr: 0x3000_0000, availUserAddr: 0x1000_2000, logGuestAddr: 0)))
        XCTAssertTrue(f.isClosedByPeer())
        waitFor("disconnect") { port.status.connection == "listening" }
        XCTAssertTrue(port.status.lastError?.contains("SET_VRING_ADDR: used_user_addr") ?? false, port.status.lastError ?? "")
        try assertPortWorks()
    }

    func testSecondFrontendRefusedFirstUndisturbed() throws {
        let first = try RawFrontend(path: socketPath)
        try first.request(.getFeatures)
        XCTAssertNotNil(try first.reply())
        let second = try RawFrontend(path: socketPath)
        XCTAssertTrue(second.isClosedByPeer(), "a second frontend must be refused")
        waitFor("rejection counted") { port.status.rejectedConnections == 1 }
        try first.request(.getProtocolFeatures)
        XCTAssertNotNil(try first.reply(), "the first frontend keeps working")
        XCTAssertEqual(port.status.connection, "connected")
    }

    func testOtherPortUnaffectedByBadInput() throws {
        let other = try RawFrontend(path: dir + "/vdpa1.sock")
        try other.request(.getFeatures)
        XCTAssertNotNil(try other.reply())
        try assertClosed([UInt8](repeating: 0, count: 12), expect: "request")
        try other.request(.getFeatures)
        XCTAssertNotNil(try other.reply(), "the other port's frontend keeps its connection")
    }

    func testReconnectStartsClean() throws {
        let a = try makeMemfd(name: "a", size: 0x20000)
        do {
            let f = try negotiated()
            try f.request(.setMemTable, .memoryTable([region(0, 0x20000, 0x1000_0000)]), fds: [a.raw], needReply: true)
            XCTAssertNotNil(try f.reply())
            XCTAssertEqual(port.status.memoryRegions.count, 1)
        }
        waitFor("disconnect") { port.status.connection == "listening" }
        XCTAssertTrue(port.status.memoryRegions.isEmpty)
        XCTAssertEqual(port.status.features.acked, "0x0")
        let f = try RawFrontend(path: socketPath)
        try f.request(.getQueueNum)
        XCTAssertTrue(f.isClosedByPeer(), "protocol features from the old connection must not carry over")
    }

    func testControlSocketStatus() throws {
        let data = try ControlClient.request("status", controlPath: dir + "/control.sock")
        let status = try JSONDecoder().decode(DaemonStatus.self, from: data)
        XCTAssertEqual(status.ports.map(\.id), ["vdpa0", "vdpa1"])
        XCTAssertEqual(status.ports[0].queues.count, 2)
        let bad = try ControlClient.request("frobnicate", controlPath: dir + "/control.sock")
        XCTAssertTrue(String(decoding: bad, as: UTF8.self).contains("unknown command"))
    }

    func region(_ gpa: UInt64, _ size: UInt64, _ uva: UInt64) -> MemoryRegionDescription {
        MemoryRegionDescription(guestPhysAddr: gpa, size: size, userAddr: uva, mmapOffset: 0)
    }
}
