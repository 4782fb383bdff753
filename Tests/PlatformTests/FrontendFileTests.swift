#if canImport(Glibc)
import Glibc
#endif
import Platform
import XCTest

/// The checks on files and fds a frontend hands over (their socket-level tests are in
/// VDPATests/HostileMemoryTests.swift).
final class FrontendFileTests: XCTestCase {
    func testWindowIsCheckedAgainstTheFile() throws {
        let m = try makeMemfd(name: "window", size: 3 * 4096)
        XCTAssertEqual(refusal(m, offset: 4096, length: 3 * 4096), .beyondEnd(offset: 4096, length: 3 * 4096, fileSize: 3 * 4096))
        XCTAssertEqual(refusal(m, offset: UInt64.max - 10, length: 100), .overflow(offset: UInt64.max - 10, length: 100))
        XCTAssertEqual(refusal(m, offset: 0, length: 0), .overflow(offset: 0, length: 0))
        let w = try GuardedFileMapping(fd: m, offset: 4096 + 100, length: 200, notify: nil)
        XCTAssertEqual(w.mappedBytes, 4096, "only the page holding the window")
        XCTAssertEqual(UInt(bitPattern: w.pointer) - UInt(bitPattern: w.mappingBase), 100)
        w.pointer.storeBytes(of: 0xAB, as: UInt8.self)
        var b: UInt8 = 0
        XCTAssertEqual(pread(m.raw, &b, 1, 4096 + 100), 1)
        XCTAssertEqual(b, 0xAB, "the window is the file's bytes at its offset")
    }

    func refusal(_ fd: borrowing FileDescriptor, offset: UInt64, length: UInt64) -> FileWindowError? {
        do {
            _ = try GuardedFileMapping(fd: fd, offset: offset, length: length, notify: nil)
            return nil
        } catch { return error }
    }

    /// A file shrunk under a guarded mapping: the access completes on a zero page, the fault is
    /// counted and the notify eventfd is signalled, instead of SIGBUS killing the process.
    func testShrunkFileFaultIsAbsorbedAndReported() throws {
        let m = try makeMemfd(name: "shrink", size: 2 * 4096)
        let notify = SharedFD(try EventFD.make())
        let w = try GuardedFileMapping(fd: m, offset: 0, length: 2 * 4096, notify: notify)
        (w.pointer + 4096).storeBytes(of: 7, as: UInt8.self)
        XCTAssertEqual(ftruncate(m.raw, 4096), 0)
        let before = guardedMappingFaults
        XCTAssertEqual((w.pointer + 4096).load(as: UInt8.self), 0, "the vanished page reads as zero")
        XCTAssertEqual(w.faults, 1)
        XCTAssertEqual(guardedMappingFaults, before + 1)
        XCTAssertEqual(EventFD.drain(notify.raw), 1)
        (w.pointer + 4096).storeBytes(of: 9, as: UInt8.self)
        XCTAssertEqual(w.faults, 1, "the replacement page stays")
    }

    func testRingFDsMustBeEventFDsAndBecomeNonBlocking() throws {
        var p: [Int32] = [-1, -1]
        XCTAssertEqual(pipe(&p), 0)
        let r = FileDescriptor(owning: p[0]), w = FileDescriptor(owning: p[1])
        XCTAssertThrowsError(try EventFD.adoptFrontendFD(r)) {
            XCTAssertTrue("\($0)".contains("not an eventfd (it is pipe:"), "\($0)")
        }
        _ = consume w
        let e = try EventFD.make(nonBlocking: false)
        try EventFD.adoptFrontendFD(e)
        XCTAssertNotEqual(fcntl(e.raw, F_GETFL) & O_NONBLOCK, 0)
        XCTAssertEqual(EventFD.drain(e.raw), 0, "an unsignalled eventfd reads as 0 at once")
    }
}
