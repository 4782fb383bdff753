#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import Synchronization
import VhostUser
import XCTest
@testable import VDPA

/// Hostile input class 8: where the daemon creates its sockets. Symlinks planted by others are not
/// followed, directories others can write to are refused, a live socket is not taken over, and
/// mode and group cannot be redirected (shared set-up: HostileSocketSupport.swift; no daemon
/// runs before each test, each starts its own).
final class SocketPathTests: DaemonSocketTestCase {
    override var startsDaemon: Bool { false }

    func requireRoot() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to make files owned by another user") }
    }

    func startFails(_ socket: String, file: StaticString = #filePath, line: UInt = #line) -> String? {
        do {
            let d = try Daemon(specs: [PortSpec(id: "p", socketPath: socket)], controlPath: nil, logger: logger)
            do { try d.start() } catch { return "\(error)" }
            d.stop()
            return nil
        } catch {
            XCTFail("\(error)", file: file, line: line)
            return nil
        }
    }

    func makeDir(_ path: String, mode: mode_t, owner: uid_t? = nil) throws {
        XCTAssertEqual(mkdir(path, 0o700), 0, path)
        XCTAssertEqual(chmod(path, mode), 0, path)  // mkdir's mode is masked by the umask
        if let owner { XCTAssertEqual(chown(path, owner, owner), 0, path) }
    }

    /// A symlink someone else planted on the socket's path is not followed (neither to create
    /// directories nor to bind); root's own symlinks (like /var/run -> /run) are.
    func testPlantedSymlinkInTheSocketPathIsNotFollowed() throws {
        try requireRoot()
        try makeDir(dir + "/elsewhere", mode: 0o755)
        XCTAssertEqual(symlink(dir + "/elsewhere", dir + "/planted"), 0)
        XCTAssertEqual(lchown(dir + "/planted", 65534, 65534), 0)
        let err = startFails(dir + "/planted/sub/p.sock")
        XCTAssertNotNil(err, "a socket was created through a symlink owned by another user")
        XCTAssertTrue(err?.contains(dir + "/planted") ?? false, "the error names the symlink: \(err ?? "")")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/elsewhere/sub"), "a directory was created through the symlink")
        // Control: a symlink owned by root is followed.
        XCTAssertEqual(symlink(dir + "/elsewhere", dir + "/ours"), 0)
        XCTAssertNil(startFails(dir + "/ours/p.sock"))
        // A symlink at the socket path itself is neither followed nor removed.
        XCTAssertEqual(symlink(dir + "/elsewhere/target", dir + "/elsewhere/q.sock"), 0)
        XCTAssertTrue(startFails(dir + "/elsewhere/q.sock")?.contains("not a socket") ?? false)
        var st = stat()
        XCTAssertEqual(lstat(dir + "/elsewhere/q.sock", &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFLNK)
    }

    /// A socket directory (or a directory above it) that others can write to and that is not
    /// sticky is refused with an error naming it; a sticky one (like /tmp) is accepted.
    func testDirectoryWritableByOthersIsRefused() throws {
        try makeDir(dir + "/world", mode: 0o777)
        try makeDir(dir + "/group", mode: 0o775)
        try makeDir(dir + "/sticky", mode: 0o1777)
        for d in [dir + "/world", dir + "/group"] {
            let err = startFails(d + "/p.sock")
            XCTAssertNotNil(err, "a socket was created in \(d), writable by others")
            XCTAssertTrue(err?.contains(d) ?? false && err?.contains("writable") ?? false, "error: \(err ?? "")")
        }
        let below = startFails(dir + "/world/sub/p.sock")
        XCTAssertTrue(below?.contains(dir + "/world ") ?? false, "a directory above the socket's is checked too: \(below ?? "")")
        XCTAssertNil(startFails(dir + "/sticky/p.sock"), "a sticky directory is fine")
    }

    /// A live socket at the port's path whose listener never accepts (backlog full): the
    /// daemon refuses to take it over, and the check does not hang start-up in connect().
    func testLiveSocketWithFullBacklogIsRefusedWithoutHanging() throws {
        let path = dir + "/busy.sock"
        let backlog = try FullBacklog(path: path)
        let result = Mutex<String?>(nil)
        let raw = backlog.listener.raw
        let log = logger
        XCTAssertTrue(returns(within: Self.stopBound, {
            do {
                let d = try Daemon(specs: [PortSpec(id: "p", socketPath: path)], controlPath: nil, logger: log)
                do { try d.start(); d.stop() } catch { result.withLock { $0 = "\(error)" } }
            } catch { result.withLock { $0 = "unexpected: \(error)" } }
        }, unblock: { _ = Glibc.close(Glibc.accept(raw, nil, nil)) }), "start-up hung probing a live socket that never accepts")
        let err = result.withLock { $0 } ?? ""
        XCTAssertTrue(err.contains("in use"), "error: \(err)")
        withExtendedLifetime(backlog) {}
    }

    /// A socket directory owned by another user is refused.
    func testDirectoryOwnedByAnotherUserIsRefused() throws {
        try requireRoot()
        try makeDir(dir + "/theirs", mode: 0o755, owner: 65534)
        let err = startFails(dir + "/theirs/p.sock")
        XCTAssertNotNil(err, "a socket was created in a directory owned by another user")
        XCTAssertTrue(err?.contains(dir + "/theirs") ?? false && err?.contains("owned by uid 65534") ?? false, "error: \(err ?? "")")
    }

    /// An attacker who swaps the socket path for a symlink as soon as the socket appears cannot
    /// redirect the mode or group to another file: they are set before the socket is visible.
    /// Removing the socket at stop leaves whatever is at the path now alone.
    func testSocketModeAndGroupCannotBeRedirectedBySwappingThePath() throws {
        let victim = dir + "/victim"
        XCTAssertTrue(FileManager.default.createFile(atPath: victim, contents: Data("x".utf8)))
        XCTAssertEqual(chmod(victim, 0o600), 0)
        let path = dir + "/p.sock"
        let group: gid_t = getgid() == 0 ? 1 : getgid()
        let (listener, file) = try createListeningSocket(path, ownership: SocketOwnership(group: group, mode: 0o666)) {
            // The attacker: take the socket away and put a symlink to the victim in its place.
            XCTAssertEqual(rename(path, path + ".moved"), 0)
            XCTAssertEqual(symlink(victim, path), 0)
        }
        var st = stat()
        XCTAssertEqual(stat(victim, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "the socket's mode was applied to the victim through the symlink")
        XCTAssertEqual(st.st_gid, getgid(), "the socket's group was applied to the victim through the symlink")
        XCTAssertEqual(stat(path + ".moved", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o666, "the socket itself has its mode")
        XCTAssertEqual(st.st_gid, group)
        file.remove()
        XCTAssertEqual(lstat(path, &st), 0, "removing our socket must not remove what is at the path now")
        _ = listener
    }
}
