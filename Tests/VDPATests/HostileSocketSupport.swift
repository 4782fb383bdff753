#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Logging
import Platform
import Synchronization
import VhostUser
import XCTest
@testable import VDPA

// Hostile input classes 7 (no thread can be held hostage) and 8 (socket paths), over real
// sockets: what the three test classes share. Each test shows the attack and asserts that the
// port (or control) thread stays responsive; docs/TESTING.md lists them, scripts/mutation-check
// shows each one failing without its fix. HostileSocketTests: the vhost-user port's deadlines;
// HostileControlSocketTests: the control socket; SocketPathTests: where sockets are created.

/// True once the peer has closed its end of `fd` (hang-up), even with unread data queued.
func peerHangsUp(_ fd: Int32, within seconds: Double) -> Bool {
    let deadline = Deadline(secondsFromNow: seconds)
    var pfd = pollfd(fd: fd, events: Poll.peerClosed, revents: 0)
    while true {
        let left = deadline.remainingMillis
        let r = poll(&pfd, 1, left)
        if r > 0, pfd.revents & (Int16(POLLHUP | POLLERR) | Poll.peerClosed) != 0 { return true }
        if r < 0 && errno != EINTR { return false }
        if left == 0 { return false }
    }
}

/// Bytes we sent on `fd` that the peer has not read yet (SIOCOUTQ).
func unreadByPeer(_ fd: Int32) -> Int32 {
    var n: Int32 = 0
    _ = ioctl(fd, UInt(0x5411), &n)  // TIOCOUTQ == SIOCOUTQ
    return n
}

/// Bytes queued for us to read on `fd` (SIOCINQ).
func queuedForUs(_ fd: Int32) -> Int32 {
    var n: Int32 = 0
    _ = ioctl(fd, UInt(0x541B), &n)  // FIONREAD == SIOCINQ
    return n
}

/// The scheduler state ('R', 'S', ...) of this process's thread named `name`, if there is one.
func threadState(named name: String) -> Character? {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    for t in tasks {
        guard let comm = try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8),
              comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
              let stat = try? String(contentsOfFile: "/proc/self/task/\(t)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        return stat[stat.index(close, offsetBy: 2)]
    }
    return nil
}

/// Runs `body` on its own thread and says whether it returned within `seconds`. If it did not,
/// `unblock` runs (removing what holds it) and `body` is waited for before returning false.
func returns(within seconds: Double, _ body: @escaping @Sendable () -> Void, unblock: () -> Void) -> Bool {
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        body()
        done.signal()
    }
    if done.wait(timeout: .now() + seconds) == .success { return true }
    unblock()
    _ = done.wait(timeout: .now() + 30)
    return false
}

/// A frontend that sends `first` at once, then the rest of `bytes` one byte per `interval`,
/// until stopped (a slow-loris: every read sees progress, the message never ends in time).
final class Dribbler: Sendable {
    let fd: Int32
    private let stopSignal = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    let sentCount = Atomic<Int>(0)

    init(path: String, bytes: [UInt8], first: Int, interval: Double = 1.0) throws {
        fd = try UnixSocket.connect(path: path).take()
        // Safety: the pointer is used only for this one send() call inside the closure.
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, first, Int32(MSG_NOSIGNAL)) }
        sentCount.store(first, ordering: .relaxed)
        Thread.detachNewThread { [self] in
            for i in first..<bytes.count {
                if stopSignal.wait(timeout: .now() + interval) == .success { break }
                var b = bytes[i]
                if send(fd, &b, 1, Int32(MSG_NOSIGNAL)) != 1 { break }
                sentCount.store(i + 1, ordering: .relaxed)
            }
            finished.signal()
        }
    }

    private let stopped = Atomic<Bool>(false)

    /// Stops dribbling and closes the connection (once; later calls do nothing).
    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        stopSignal.signal()
        finished.wait()
        Glibc.close(fd)
    }
}

/// A listener at `path` that never accepts, its backlog filled with connections it never accepts:
/// a connect to it cannot complete until `makeRoom` (or an accept) frees a slot.
final class FullBacklog {
    let listener: FileDescriptor
    /// The connections that fill the backlog, closed by `makeRoom` or when this goes away.
    private(set) var fillers: [Int32] = []

    init(path: String) throws {
        listener = try UnixSocket.listen(path: path, backlog: 0)
        while fillers.count < 16, let f = try? UnixSocket.connect(path: path, nonBlocking: true) { fillers.append(f.take()) }
    }

    /// Closes the fillers (their connections stay queued at the listener until accepted).
    func makeRoom() {
        for f in fillers { Glibc.close(f) }
        fillers = []
    }

    deinit { makeRoom() }
}

/// A daemon with two ports (vdpa0, vdpa1) and a control socket in a fresh directory, started
/// before each test (unless `startsDaemon` is false: the directory alone) and stopped after it,
/// which must take less than 5 s.
class DaemonSocketTestCase: XCTestCase {
    var dir = ""
    var daemon: Daemon?
    var socketPath: String { dir + "/vdpa0.sock" }
    var controlPath: String { dir + "/control.sock" }
    var port: VDPA.Port { daemon!.ports[0] }
    static let idleTimeout = 3.0
    static let maxControlClients = 3
    /// A stop that is not held by any peer returns at once; this leaves room for a loaded machine.
    static let stopBound = 2.0
    /// Whether `setUp` starts the daemon.
    var startsDaemon: Bool { true }

    var logger: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    override func setUpWithError() throws {
        dir = "/tmp/vdpa-hsock-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard startsDaemon else {
            // As the daemon would create it: 0755, owned by us (an explicit chmod, whatever the umask).
            XCTAssertEqual(mkdir(dir, 0o700), 0, dir)
            XCTAssertEqual(chmod(dir, 0o755), 0, dir)
            return
        }
        let d = try Daemon(specs: [PortSpec(id: "vdpa0", socketPath: dir + "/vdpa0.sock"),
                                   PortSpec(id: "vdpa1", socketPath: dir + "/vdpa1.sock")],
                           controlPath: dir + "/control.sock", logger: logger,
                           controlOptions: ControlOptions(maxClients: Self.maxControlClients, idleTimeoutSeconds: Self.idleTimeout))
        try d.start()
        daemon = d
    }

    override func tearDown() {
        if let d = daemon {
            let start = Date()
            d.stop()
            XCTAssertLessThan(Date().timeIntervalSince(start), 5, "daemon shutdown took too long")
        }
        daemon = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    func waitFor(_ what: String, seconds: Double = 5, file: StaticString = #filePath, line: UInt = #line, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() && Date() < deadline { usleep(10_000) }
        XCTAssertTrue(condition(), "timed out waiting for \(what)", file: file, line: line)
    }

    /// A new, well-formed frontend on `path` gets an answer.
    func assertFrontendWorks(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let f = try RawFrontend(path: path)
        try f.request(.getFeatures)
        let r = try XCTUnwrap(try f.reply(), "no reply to GET_FEATURES on \(path)", file: file, line: line)
        XCTAssertEqual(r.0.request, VhostUserRequest.getFeatures.rawValue, file: file, line: line)
    }

    /// The other port answers while port 0 is under attack.
    func assertOtherPortUndisturbed(file: StaticString = #filePath, line: UInt = #line) throws {
        try assertFrontendWorks(dir + "/vdpa1.sock", file: file, line: line)
    }
}
