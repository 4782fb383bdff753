import Virtio

/// The top of the IOVA space the guest's memory may use. IOVAs at and above it belong to the
/// daemon (the relay's mediated rings are mapped there), so a port refuses guest memory regions
/// that reach it, and a device translates guest buffers through the guest's regions only.
public let reservedIOVABase: UInt64 = 1 << 46

/// The guest's memory as a device is given it: regions of guest-physical space (IOVA = GPA) and
/// where the daemon has them mapped. `owner` keeps the mappings alive: a device holds this value
/// for as long as it may touch the memory.
public struct DeviceMemory: @unchecked Sendable {
    // @unchecked Sendable: immutable; the host addresses stay valid while `owner` is alive, and
    // every holder of this value holds `owner`.
    public let regions: [GuestMemoryView.Region]
    public let owner: AnyObject?

    public init(regions: [GuestMemoryView.Region], owner: AnyObject?) {
        self.regions = regions
        self.owner = owner
    }

    public static let empty = DeviceMemory(regions: [], owner: nil)
}
