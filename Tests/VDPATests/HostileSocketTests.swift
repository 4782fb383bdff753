#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import VhostUser
import XCTest
@testable import VDPA

/// Hostile input class 7 on the vhost-user port: a frontend cannot hold the port thread (or the
/// daemon's stop) hostage: messages and replies have deadlines, a client-mode connect does not
/// block (shared set-up: HostileSocketSupport.swift).
final class HostileSocketTests: DaemonSocketTestCase {
    /// Half a header, then one byte a second: every read makes progress, so a per-read timeout
    /// never fires. The whole message is due 5 s after its first byte.
    func testDribblingFrontendIsCutAtTheMessageDeadline() throws {
        let message = VhostUserCodec.encodeRequest(.setFeatures, payload: .u64(1 << 32))  // 20 bytes: 14 s at 1 byte/s
        let start = Date()
        let d = try Dribbler(path: socketPath, bytes: message, first: 6)
        defer { d.stop() }
        try assertOtherPortUndisturbed()
        XCTAssertTrue(peerHangsUp(d.fd, within: Port.messageTimeoutSeconds + 3),
                      "a frontend dribbling one byte a second kept its message open past the deadline")
        XCTAssertLessThan(d.sentCount.load(ordering: .relaxed), message.count, "the message must not have completed")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), Port.messageTimeoutSeconds - 0.5, "cut before the deadline")
        waitFor("disconnect") { port.status.connection == "listening" }
        let err = port.status.lastError ?? ""
        XCTAssertTrue(err.contains("deadline"), "lastError should say the deadline passed: \(err)")
        try assertFrontendWorks(socketPath)
    }

    /// stop() returns at once while a frontend holds a message open, not when the peer lets go.
    func testStopReturnsWhileAFrontendDribbles() throws {
        let message = VhostUserCodec.encodeRequest(.setFeatures, payload: .u64(1 << 32))
        let d = try Dribbler(path: socketPath, bytes: message, first: 6)
        // The port has read the first bytes: it is inside the message, waiting for the rest.
        waitFor("the port to read the first bytes") { unreadByPeer(d.fd) == 0 && port.status.connection == "connected" }
        let daemon = self.daemon!
        self.daemon = nil
        let start = Date()
        XCTAssertTrue(returns(within: Self.stopBound, { daemon.stop() }, unblock: { d.stop() }),
                      "daemon.stop() was held by a frontend that never finishes its message")
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        XCTAssertTrue(peerHangsUp(d.fd, within: 1), "the connection closes with the daemon")
        d.stop()
    }

    /// Sends requests that need replies and never reads, until the port stops taking requests
    /// (no room for 500 ms: it is stuck on a reply). Returns the number of requests sent.
    func floodWithoutReading(_ fd: borrowing FileDescriptor, max: Int = 200_000) throws -> Int {
        try UnixSocket.setBlocking(fd, false)
        let one = VhostUserCodec.encodeRequest(.getFeatures, payload: .none)
        var sent = 0
        while sent < max {
            let n = try UnixSocket.sendAvailable(fd, one)
            if n == 0 {
                var pfd = pollfd(fd: fd.raw, events: Int16(POLLOUT), revents: 0)
                if poll(&pfd, 1, 500) == 1 && pfd.revents & Int16(POLLOUT) != 0 { continue }
                break
            }
            XCTAssertEqual(n, one.count)
            sent += 1
        }
        return sent
    }

    /// A frontend that sends many requests needing replies and never reads them is
    /// disconnected once a reply has waited the reply deadline; the port serves the next one.
    func testFrontendThatNeverReadsRepliesIsDisconnected() throws {
        let fd = try UnixSocket.connect(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        let sent = try floodWithoutReading(fd)
        XCTAssertGreaterThan(sent, 100)
        try assertOtherPortUndisturbed()
        let closed = peerHangsUp(fd.raw, within: Port.replyTimeoutSeconds + 5)
        XCTAssertTrue(closed, "a frontend that never reads its replies held the port thread")
        _ = consume fd  // without the fix, this is what frees the port thread
        waitFor("disconnect") { port.status.connection == "listening" }
        if closed {
            let err = port.status.lastError ?? ""
            XCTAssertTrue(err.contains("sending reply") && err.contains("deadline"), "lastError: \(err)")
        }
        try assertFrontendWorks(socketPath)
    }

    /// stop() returns at once while the port waits for a frontend to read its replies.
    func testStopReturnsWhileAFrontendIgnoresReplies() throws {
        let fd = try UnixSocket.connect(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        _ = try floodWithoutReading(fd)
        // The port thread sleeps although requests wait for it: it waits for room for a reply.
        var sleeps = 0
        waitFor("the port thread to wait on a reply") {
            if unreadByPeer(fd.raw) > 0 && threadState(named: "port-vdpa0") == "S" { sleeps += 1 } else { sleeps = 0 }
            return sleeps >= 3
        }
        let daemon = self.daemon!
        self.daemon = nil
        let raw = fd.raw
        XCTAssertTrue(returns(within: Self.stopBound, { daemon.stop() }, unblock: { _ = shutdown(raw, Int32(SHUT_RDWR)) }),
                      "daemon.stop() was held by a frontend that does not read its replies")
        _ = consume fd
    }

    /// Client mode: a frontend that listens but never accepts (its backlog full) cannot hold the
    /// port thread in connect(); the port reports it, retries, and connects once there is room.
    func testClientConnectToAFrontendThatNeverAccepts() throws {
        let frontendPath = dir + "/frontend.sock"
        let backlog = try FullBacklog(path: frontendPath)
        XCTAssertLessThan(backlog.fillers.count, 16, "the backlog should be full")
        let client = try Port(spec: PortSpec(id: "c0", socketPath: frontendPath, client: true), device: nil, logger: logger)
        try client.start()
        waitFor("the port to report the failed connect") { client.status.lastError?.contains("connect") ?? false }
        XCTAssertEqual(client.status.connection, "connecting")
        // Room in the backlog: the port connects on its next try, and serves the frontend.
        backlog.makeRoom()
        var pfd = pollfd(fd: backlog.listener.raw, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, 0) == 1 { _ = try UnixSocket.accept(backlog.listener) }  // the fillers' queued connections
        XCTAssertEqual(poll(&pfd, 1, 8000), 1, "the port did not connect once the backlog had room")
        let backend = try UnixSocket.accept(backlog.listener)
        try UnixSocket.setReceiveTimeout(backend, seconds: 5)
        try UnixSocket.send(backend, VhostUserCodec.encodeRequest(.getFeatures, payload: .none))
        var header = [UInt8](repeating: 0, count: 12)
        var fds = ReceivedFDs()
        try header.withUnsafeMutableBytes { try UnixSocket.receiveExactly(backend, into: $0, fds: &fds) }
        XCTAssertEqual(header.withUnsafeBytes { VhostUserCodec.decodeReplyHeader($0)?.request }, VhostUserRequest.getFeatures.rawValue)
        XCTAssertTrue(returns(within: Self.stopBound, { client.stop() }, unblock: {}))
        _ = consume backend
        withExtendedLifetime(backlog) {}
    }

    /// Client mode: stop() returns at once while the frontend's backlog is full.
    func testStopReturnsWhileClientConnectCannotComplete() throws {
        let backlog = try FullBacklog(path: dir + "/frontend.sock")
        let client = try Port(spec: PortSpec(id: "c0", socketPath: dir + "/frontend.sock", client: true), device: nil, logger: logger)
        try client.start()
        let raw = backlog.listener.raw
        // Unblocking: accepting one queued connection makes room, which wakes a blocked connect().
        XCTAssertTrue(returns(within: Self.stopBound, { client.stop() }, unblock: { _ = Glibc.close(Glibc.accept(raw, nil, nil)) }),
                      "Port.stop() was held by a connect() to a frontend that never accepts")
        withExtendedLifetime(backlog) {}
    }
}
