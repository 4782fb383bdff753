#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// An owned shared memory mapping, unmapped exactly once when the owner goes away.
public struct MemoryMapping: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// Maps `length` bytes of `fd` at `offset`, shared, read-write. A regular file (a memfd, a
    /// file under /dev/shm or hugetlbfs) must back every page of the range: Linux maps past the
    /// end of a file without complaint, then kills the process with SIGBUS when a page wholly past
    /// the end is touched. The fds mapped here come from frontends, so a region or log announced
    /// larger than its file is refused (EINVAL) instead of crashing the daemon later.
    /// (A file that the frontend shrinks after this check faults later: guest memory and logs are
    /// mapped through `GuardedFileMapping`, whose SIGBUS guard absorbs that.)
    public init(fd: borrowing FileDescriptor, offset: UInt64, length: Int) throws(SystemError) {
        guard length > 0, offset <= UInt64(Int.max) else { throw SystemError("mmap", errno: EINVAL) }
        var st = stat()
        if fstat(fd.raw, &st) == 0 && st.st_mode & S_IFMT == S_IFREG {
            // The page holding the file's last byte is mapped whole; only pages past it fault.
            let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
            let backed = (UInt64(st.st_size) + page - 1) / page * page
            let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
            guard !overflow, end <= backed else {
                throw SystemError("mmap of \(length) bytes at offset \(offset) of a \(st.st_size)-byte file", errno: EINVAL)
            }
        }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, off_t(offset))
        guard let p, p != MAP_FAILED else { throw SystemError("mmap", errno: cvdpa_errno()) }
        base = p
        self.length = length
    }

    /// Anonymous private memory (for rings the daemon owns).
    public init(anonymous length: Int) throws(SystemError) {
        guard length > 0 else { throw SystemError("mmap", errno: EINVAL) }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap", errno: cvdpa_errno()) }
        base = p
        self.length = length
    }

    deinit {
        _ = munmap(base, length)
    }
}

/// memfd_create + ftruncate: anonymous shared memory that can be passed to another process.
public func makeMemfd(name: String, size: Int) throws(SystemError) -> FileDescriptor {
    let raw = try syscallRetrying("memfd_create") {
        cvdpa_memfd_create(name, UInt32(CVDPA_MFD_CLOEXEC))
    }
    let fd = FileDescriptor(owning: raw)
    try syscallRetrying("ftruncate") { ftruncate(fd.raw, off_t(size)) }
    return fd
}
