/// Guest memory made of one zero-filled host buffer placed at `baseGPA`.
///
/// For tests and fuzzing only: the daemon translates through the vhost-user memory table.
/// The buffer lives as long as the object; pointers from `hostPointer` die with it.
public final class FlatGuestMemory: GuestMemoryAccess {
    public let baseGPA: UInt64
    public let size: Int
    /// Host address of `baseGPA`, 64-byte aligned.
    public let base: UnsafeMutableRawPointer

    public init(size: Int, baseGPA: UInt64 = 0) {
        precondition(size >= 0, "negative size")
        self.baseGPA = baseGPA
        self.size = size
        // Safety: owned allocation, zero-initialised here and freed only in deinit.
        base = .allocate(byteCount: max(size, 1), alignment: 64)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: max(size, 1))
    }

    /// A copy of `bytes` placed at `baseGPA`, padded with zeros up to `minimumSize`.
    public convenience init(copying bytes: UnsafeRawBufferPointer, baseGPA: UInt64 = 0, minimumSize: Int = 0) {
        self.init(size: max(bytes.count, minimumSize), baseGPA: baseGPA)
        if let src = bytes.baseAddress, !bytes.isEmpty {
            base.copyMemory(from: src, byteCount: bytes.count)
        }
    }

    deinit {
        base.deallocate()
    }

    @inlinable
    public func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        guard let offset = GuestRange.offset(gpa: gpa, length: length, regionStart: baseGPA,
                                             regionSize: UInt64(size)) else { return nil }
        // Safety: offset + length <= size, so the pointer and the range stay inside the buffer.
        return base + Int(offset)
    }

    /// A pointer to `length` bytes at `gpa`; traps if unmapped (test helper, not for guest input).
    public func pointer(gpa: UInt64, length: UInt64 = 1) -> UnsafeMutableRawPointer {
        guard let p = hostPointer(gpa: gpa, length: length) else {
            preconditionFailure("gpa 0x\(String(gpa, radix: 16)) +\(length) outside FlatGuestMemory")
        }
        return p
    }
}
