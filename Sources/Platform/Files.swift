#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// Plain file operations by path: reading a (/proc) file whole, removing a file.
public enum FileSystem {
    /// Reads the file at `path` to its end. /proc files report a size of 0 and are produced as
    /// they are read, so this reads until EOF rather than trusting `fstat`.
    public static func readAll(_ path: String) throws(SystemError) -> [UInt8] {
        let fd = FileDescriptor(owning: try syscallRetrying("open(\(path))") { openRaw(path, O_RDONLY | O_CLOEXEC) })
        var out: [UInt8] = []
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { chunk.deallocate() }
        while true {
            // Safety: read writes at most chunk.count bytes into the chunk, allocated above.
            let n = try syscallRetrying("read(\(path))") { readRaw(fd.raw, chunk.baseAddress!, chunk.count) }
            if n == 0 { return out }
            out += chunk[0..<n]
        }
    }

    /// Reads the file at `path` whole, as UTF-8 text.
    public static func readText(_ path: String) throws(SystemError) -> String {
        String(decoding: try readAll(path), as: UTF8.self)
    }

    /// Removes the file at `path` (not a directory); returns false when there was none (ENOENT).
    @discardableResult
    public static func removeIfPresent(_ path: String) throws(SystemError) -> Bool {
        do throws(SystemError) {
            try syscallRetrying("unlink(\(path))") { unlinkRaw(path) }
            return true
        } catch where error.code == .noSuchFile {
            return false
        }
    }

    // Syscall wrappers: @inline(never) so nothing runs between the call and reading errno.
    // Safety: the String is bridged to a NUL-terminated C string valid for the call only.
    @inline(never) static func openRaw(_ p: String, _ flags: Int32) -> Int32 { open(p, flags) }
    @inline(never) static func unlinkRaw(_ p: String) -> Int32 { unlink(p) }
    // Safety: the caller passes a buffer of at least `n` writable bytes, valid for the call.
    @inline(never) static func readRaw(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Int { read(fd, p, n) }
}
