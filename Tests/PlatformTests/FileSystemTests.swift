#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import XCTest

/// `FileSystem` (whole-file reads, removal by path), `Errno` names, `Groups` and `MonotonicClock`.
final class FileSystemTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = "/tmp/vdpa-platform-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: dir)  // best effort: a leftover /tmp directory fails nothing
    }

    /// A file larger than one read chunk comes back whole, byte for byte.
    func testReadAllReadsPastOneChunk() throws {
        let bytes = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/f", contents: Data(bytes)))
        XCTAssertEqual(try FileSystem.readAll(dir + "/f"), bytes)
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/empty", contents: Data()))
        XCTAssertEqual(try FileSystem.readAll(dir + "/empty"), [])
    }

    /// /proc files say they are empty (st_size 0) and still have content: read until EOF.
    func testReadTextOfAProcFile() throws {
        XCTAssertTrue(try FileSystem.readText("/proc/self/status").contains("Pid:\t\(getpid())\n"))
    }

    /// A missing file is an error named ENOENT, with the path in the call, not an empty read.
    func testReadOfAMissingFileThrowsNoSuchFile() {
        XCTAssertThrowsError(try FileSystem.readAll(dir + "/missing")) { error in
            let e = error as? SystemError
            XCTAssertEqual(e?.code, .noSuchFile)
            XCTAssertTrue(e?.call.contains(dir + "/missing") ?? false, "\(error)")
        }
    }

    func testRemoveIfPresent() throws {
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/f", contents: Data("x".utf8)))
        XCTAssertTrue(try FileSystem.removeIfPresent(dir + "/f"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/f"))
        XCTAssertFalse(try FileSystem.removeIfPresent(dir + "/f"), "absent: nothing to remove, no error")
        // Any other failure is thrown: a directory is not unlinked.
        XCTAssertThrowsError(try FileSystem.removeIfPresent(dir)) { error in
            XCTAssertNotEqual((error as? SystemError)?.code, .noSuchFile)
        }
    }

    func testErrnoNames() {
        XCTAssertEqual(SystemError("x", errno: EAGAIN).code, .wouldBlock)
        XCTAssertEqual(SystemError("x", errno: EWOULDBLOCK).code, .wouldBlock)
        XCTAssertEqual(SystemError("x", .connectionRefused).errno, ECONNREFUSED)
        XCTAssertTrue(SystemError("x", errno: EPIPE).isPeerGone)
        XCTAssertTrue(SystemError("x", errno: ECONNRESET).isPeerGone)
        XCTAssertFalse(SystemError("x", errno: EAGAIN).isPeerGone)
        XCTAssertEqual(Errno.noSuchFile.description, "No such file or directory")
    }

    /// The group of this process is found by its name; a name that no group has is nil.
    func testGroupLookUp() throws {
        let mine = getgid()
        guard let entry = getgrgid(mine) else { throw XCTSkip("gid \(mine) has no name on this machine") }
        let name = String(cString: entry.pointee.gr_name)
        XCTAssertEqual(try Groups.id(named: name), mine)
        XCTAssertNil(try Groups.id(named: "no-such-group-\(UInt32.random(in: 0...UInt32.max))"))
    }

    func testSleepLastsAtLeastItsTime() {
        let start = MonotonicClock.nanoseconds
        MonotonicClock.sleep(seconds: 0.05)
        let slept = MonotonicClock.nanoseconds - start
        XCTAssertGreaterThanOrEqual(slept, 50_000_000)
        XCTAssertLessThan(slept, 2_000_000_000)
        let before = MonotonicClock.nanoseconds
        MonotonicClock.sleep(seconds: -1)
        MonotonicClock.sleep(seconds: .nan)
        XCTAssertLessThan(MonotonicClock.nanoseconds - before, 50_000_000, "negative and NaN do not sleep")
    }
}
