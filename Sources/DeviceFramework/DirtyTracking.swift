/// A device whose IOMMU records which pages the device wrote: the interface a real IOMMU with
/// hardware dirty bits gives through IOMMUFD, so that a device backed by IOMMUFD is a driver of
/// this protocol, not a redesign. `setDirtyTracking` is IOMMU_HWPT_SET_DIRTY_TRACKING
/// (flags IOMMU_HWPT_DIRTY_TRACKING_ENABLE or 0); `readAndClearDirty` is
/// IOMMU_HWPT_GET_DIRTY_BITMAP without IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR (iova, length,
/// page_size, data: the bits are ORed into the caller's bitmap, as the kernel's iova_bitmap does).
///
/// With it a port can keep its rings direct during a live migration (`migration=iommu-dirty`):
/// the daemon folds the device's bits into the frontend's log (see VDPA's `DirtyFolder`). A
/// device without it (the kernel vhost-vdpa driver today: vhost-vdpa has no dirty-log ioctl)
/// migrates through the relay; a port asking it for `migration=iommu-dirty` is refused when it is
/// created.
public protocol DirtyTrackingDevice: AnyObject, Sendable {
    /// The page size the device's bits cover (IOMMUFD: one of IOMMU_GET_HW_INFO's page sizes).
    var dirtyPageSize: UInt64 { get }
    /// Starts or stops recording writes. Returns once the device applies it: after
    /// `enabled: false` returns, no further bit is set; bits set before stay until read.
    func setDirtyTracking(enabled: Bool) throws(DeviceError)
    /// ORs into `bitmap` the dirty bits of the pages of [iova, iova + length) (bit i, in
    /// little-endian 64-bit words, for the page at iova + i * pageSize) and clears them in the
    /// device, atomically per bit against the device's writes. Callable from any thread while
    /// the device runs. Returns the number of dirty pages found.
    func readAndClearDirty(iova: UInt64, length: UInt64, pageSize: UInt64,
                           into bitmap: UnsafeMutableRawBufferPointer) throws(DeviceError) -> UInt64
}

extension VDPADevice {
    /// The device's dirty tracking, if its IOMMU has any.
    public var dirtyTracking: (any DirtyTrackingDevice)? { self as? any DirtyTrackingDevice }
}
