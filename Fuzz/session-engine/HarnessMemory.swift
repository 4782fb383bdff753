// Guest memory as the frontend (and the guest in it) sees it (session-engine fuzz target: see
// main.swift).

#if canImport(Glibc)
import Glibc
#endif
import Platform
import VhostUser

/// One memfd the harness created and mapped for itself. Guest writes go through this mapping.
final class HarnessMemfd {
    let base: UnsafeMutableRawPointer
    let fileSize: Int
    let mappedLength: Int
    init?(size: Int) {
        let fd = try? makeMemfd(name: "fuzz-guest", size: size)
        guard let fd else { return nil }
        // The harness maps at least a page (mmap of 0 bytes fails) but only ever touches the file.
        mappedLength = max(size, 4096)
        let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, 0)
        guard let p, p != MAP_FAILED else { return nil }
        base = p
        fileSize = size
        rawFD = fd.take()
    }
    /// Our own fd; a duplicate goes to the session with each message that carries it.
    private(set) var rawFD: Int32
    func dupForSession() -> Int32 { fcntl(rawFD, F_DUPFD_CLOEXEC, 0) }
    deinit {
        munmap(base, mappedLength)
        close(rawFD)
    }
}

struct GuestRegion {
    var desc: MemoryRegionDescription
    var file: HarnessMemfd

    /// Host pointer (harness mapping) for [gpa, gpa+length) if inside this region and backed by the file.
    func host(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        guard gpa >= desc.guestPhysAddr else { return nil }
        let off = gpa - desc.guestPhysAddr
        guard off <= desc.size, length <= desc.size - off else { return nil }
        let (fileOff, o1) = desc.mmapOffset.addingReportingOverflow(off)
        let (end, o2) = fileOff.addingReportingOverflow(length)
        guard !o1, !o2, end <= UInt64(file.fileSize) else { return nil }
        return file.base + Int(fileOff)
    }
}
