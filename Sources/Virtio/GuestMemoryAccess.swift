/// Translation of guest physical addresses (GPAs) to host pointers.
///
/// Implementations return a pointer only when the whole range `[gpa, gpa + length)` lies in
/// one contiguous host mapping; any range that wraps around 2^64, straddles two regions or
/// touches an unmapped byte gives `nil`. Hot paths take a generic `<M: GuestMemoryAccess>`
/// (specialised, no existential box), never `any GuestMemoryAccess`.
public protocol GuestMemoryAccess {
    /// A host pointer to `length` bytes at `gpa`, or nil if the range is not mapped contiguously.
    /// A zero-length range is mapped when `gpa` is inside a region or at its end.
    func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer?
}

/// Overflow-safe range arithmetic shared by memory implementations.
public enum GuestRange {
    /// The offset of `[gpa, gpa + length)` inside the region `[regionStart, regionStart + regionSize)`,
    /// or nil when the range does not fit. Never overflows, whatever the inputs.
    @inlinable
    public static func offset(gpa: UInt64, length: UInt64, regionStart: UInt64, regionSize: UInt64) -> UInt64? {
        guard gpa >= regionStart else { return nil }
        let offset = gpa - regionStart
        guard offset <= regionSize, length <= regionSize - offset else { return nil }
        return offset
    }
}
