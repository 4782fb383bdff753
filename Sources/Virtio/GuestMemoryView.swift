/// Guest memory as a plain list of regions (guest-physical address, size, host address): how
/// data-path threads translate, without reference counting. Made by whoever owns the region
/// buffer (the vhost-user memory table, a device's IOMMU table), valid while that owner lives.
public struct GuestMemoryView: GuestMemoryAccess {
    public struct Region: Sendable {
        public var gpa: UInt64
        public var size: UInt64
        /// Host address of `gpa` (a live mapping, kept alive by whoever owns the region buffer).
        public var host: UInt
        public init(gpa: UInt64, size: UInt64, host: UInt) { self.gpa = gpa; self.size = size; self.host = host }
    }
    // Safety: points into a live region buffer (a GuestMemoryTable's, or a device IOMMU table's);
    // holders keep that owner alive while they use the view.
    @usableFromInline let base: UnsafePointer<Region>
    @usableFromInline let count: Int

    public init(base: UnsafePointer<Region>, count: Int) {
        self.base = base
        self.count = count
    }

    @inlinable @inline(__always)
    public func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let r = base[i]
            if gpa >= r.gpa {
                let off = gpa &- r.gpa
                if off < r.size || (off == r.size && length == 0) {
                    guard length <= r.size &- off else { return nil }
                    return UnsafeMutableRawPointer(bitPattern: r.host &+ UInt(off))
                }
            }
            i &+= 1
        }
        return nil
    }
}
