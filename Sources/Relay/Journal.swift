#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Synchronization

/// Test-only journal of the device writes the relay exposed (VDPAD_TEST_JOURNAL=PATH): one line
/// per written range, `ring gpa length checksum marked publishIndex monotonicNanos`, in hex where
/// it is an address. Marks are made (or skipped) before the line is written, and the used index
/// that exposes the range is published after it.
public final class JournalFile: RelayJournal, @unchecked Sendable {
    // @unchecked Sendable: the fd is immutable; writes are serialized by `lock`.
    private let fd: Int32
    private let lock = Mutex<Void>(())

    public init(path: String) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if fd < 0 { throw JournalError(message: "cannot open test journal \(path): \(String(cString: strerror(errno)))") }
    }

    deinit { close(fd) }

    public func record(ring: Int, gpa: UInt64, length: UInt32, checksum: UInt64, marked: Bool, publishIndex: UInt16) {
        let line = "\(ring) 0x\(String(gpa, radix: 16)) \(length) 0x\(String(checksum, radix: 16)) \(marked ? 1 : 0) \(publishIndex) \(cvdpa_monotonic_ns())\n"
        lock.withLock { _ in
            _ = line.withCString { write(fd, $0, strlen($0)) }
        }
    }
}

public struct JournalError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}
