import DeviceFramework
import Virtio

/// The SoftNIC's IOMMU: IOVA ranges mapped to host memory. The framework programs it from the
/// memory table (IOVA = guest-physical address, 1:1 onto the daemon's mappings); the relay adds
/// mediated rings in a reserved range above guest RAM. Every device access translates through
/// it; a miss is a device fault. Translation uses the same plain-value view as guest memory.
/// Two address spaces: guest buffers (descriptor addresses, indirect tables) translate through
/// `guestView`, the guest's regions only, so a guest can never point the device at a daemon
/// ring; the rings' own areas translate through `view`, which adds the daemon's mappings.
public final class IOMMUTable: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; `entries` is only read. The mappings behind the
    // host addresses stay alive through `keepAlive` for as long as any engine holds this table.
    let entries: UnsafeMutableBufferPointer<GuestMemoryView.Region>
    private let keepAlive: [AnyObject]
    public let count: Int
    /// Entries [0, guestCount) are the guest's memory regions; the rest are the daemon's.
    public let guestCount: Int

    public init(memory: DeviceMemory, extra: [IOVAMapping] = []) {
        var list = memory.regions
        list += extra.map { GuestMemoryView.Region(gpa: $0.iova, size: $0.size, host: UInt(bitPattern: $0.host)) }
        entries = .allocate(capacity: max(list.count, 1))
        _ = entries.initialize(from: list)
        keepAlive = (memory.owner.map { [$0] } ?? []) + extra.map(\.owner)
        count = list.count
        guestCount = memory.regions.count
    }

    deinit { entries.deallocate() }

    public static let empty = IOMMUTable(memory: .empty)

    /// A non-owning view for the data path: valid while this table is alive (the engine holds it).
    public var view: GuestMemoryView { GuestMemoryView(base: UnsafePointer(entries.baseAddress!), count: count) }
    /// The guest's regions only: where guest buffers may lie. Sound because init puts the guest's
    /// regions first in `entries` and the daemon's mappings after them.
    public var guestView: GuestMemoryView { GuestMemoryView(base: UnsafePointer(entries.baseAddress!), count: guestCount) }
}
