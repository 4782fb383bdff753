#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// An owned shared memory mapping, unmapped exactly once when the owner goes away.
public struct MemoryMapping: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// Maps `length` bytes of `fd` at `offset`, shared, read-write.
    public init(fd: borrowing FileDescriptor, offset: UInt64, length: Int) throws(SystemError) {
        guard length > 0, offset <= UInt64(Int.max) else { throw SystemError("mmap", errno: EINVAL) }
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
