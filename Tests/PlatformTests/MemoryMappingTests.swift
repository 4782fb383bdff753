#if canImport(Glibc)
import Glibc
#endif
import Platform
import XCTest

/// A shared mapping of a file must lie on pages the file backs: a page wholly past the end of
/// the file raises SIGBUS when touched (found by Fuzz/session-engine with a memfd shorter than
/// the memory region announced over it).
final class MemoryMappingTests: XCTestCase {
    func testMappingWithinTheFileSucceedsAndIsUsable() throws {
        let fd = try makeMemfd(name: "mapping-test", size: 8192)
        let m = try MemoryMapping(fd: fd, offset: 0, length: 8192)
        m.base.storeBytes(of: 0xA5, toByteOffset: 8191, as: UInt8.self)
        XCTAssertEqual(m.base.load(fromByteOffset: 8191, as: UInt8.self), 0xA5)
        // At an offset, up to the end.
        _ = try MemoryMapping(fd: fd, offset: 4096, length: 4096)
    }

    func testMappingPastTheEndOfTheFileIsRefused() throws {
        let fd = try makeMemfd(name: "mapping-test", size: 4096)
        XCTAssertThrowsError(try MemoryMapping(fd: fd, offset: 0, length: 8192)) { error in
            XCTAssertEqual((error as? SystemError)?.errno, EINVAL, "\(error)")
        }
        XCTAssertThrowsError(try MemoryMapping(fd: fd, offset: 4096, length: 1), "a range starting at the end of the file")
        XCTAssertThrowsError(try MemoryMapping(fd: fd, offset: UInt64(Int.max) - 10, length: 4096), "an offset whose end overflows")
    }

    func testTheLastPartialPageOfAFileIsMappable() throws {
        // 100 bytes: the kernel maps the whole first page (the rest reads as zero), no SIGBUS.
        let fd = try makeMemfd(name: "mapping-test", size: 100)
        let m = try MemoryMapping(fd: fd, offset: 0, length: 4096)
        XCTAssertEqual(m.base.load(fromByteOffset: 4095, as: UInt8.self), 0)
        XCTAssertThrowsError(try MemoryMapping(fd: fd, offset: 0, length: 4097))
    }

    func testFilesThatAreNotRegularAreNotSizeChecked() throws {
        // /dev/zero has size 0 but maps any length: the check applies to regular files only.
        let raw = open("/dev/zero", O_RDWR | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(raw, 0)
        let fd = FileDescriptor(owning: raw)
        let m = try MemoryMapping(fd: fd, offset: 0, length: 8192)
        XCTAssertEqual(m.base.load(fromByteOffset: 8191, as: UInt8.self), 0)
    }
}
