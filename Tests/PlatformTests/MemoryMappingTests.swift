#if canImport(Glibc)
import Glibc
#endif
import Platform
import XCTest

/// A shared mapping of a file must lie on pages the file backs: a page wholly past the end of
/// the file raises SIGBUS when touched (found by Fuzz/session-engine with a memfd shorter than
/// the memory region announced over it).
final class MemoryMappingTests: XCTestCase {
    /// The error mapping `length` bytes at `offset` throws, nil if it maps (and unmaps it again).
    func mappingError(_ fd: borrowing FileDescriptor, offset: UInt64, length: Int) -> SystemError? {
        do {
            _ = try MemoryMapping(fd: fd, offset: offset, length: length)
            return nil
        } catch {
            return error
        }
    }

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
        XCTAssertEqual(mappingError(fd, offset: 0, length: 8192)?.errno, EINVAL, "a range longer than the file")
        XCTAssertEqual(mappingError(fd, offset: 4096, length: 1)?.errno, EINVAL, "a range starting at the end of the file")
        XCTAssertEqual(mappingError(fd, offset: UInt64(Int.max) - 10, length: 4096)?.errno, EINVAL, "an offset whose end overflows")
        XCTAssertNil(mappingError(fd, offset: 0, length: 4096), "the range the file backs")
    }

    func testTheLastPartialPageOfAFileIsMappable() throws {
        // 100 bytes: the kernel maps the whole first page (the rest reads as zero), no SIGBUS.
        let fd = try makeMemfd(name: "mapping-test", size: 100)
        let m = try MemoryMapping(fd: fd, offset: 0, length: 4096)
        XCTAssertEqual(m.base.load(fromByteOffset: 4095, as: UInt8.self), 0)
        XCTAssertEqual(mappingError(fd, offset: 0, length: 4097)?.errno, EINVAL, "one byte into the second page")
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
