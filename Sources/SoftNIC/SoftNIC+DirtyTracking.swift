import DeviceFramework
import Platform

/// The SoftNIC's IOMMU dirty tracking (`IOMMUDirtyBitmap`), through the framework's
/// IOMMUFD-shaped `DirtyTrackingDevice`.
extension SoftNIC: DirtyTrackingDevice {
    public var dirtyPageSize: UInt64 { IOMMUDirtyBitmap.pageSize }

    /// The bitmap is made at the first enable (2 GiB of sparse address space) and kept. Enabling
    /// does not clear bits left from an earlier tracking period: they were folded before that
    /// period ended (the daemon folds after disabling), and a stale bit could only add a page.
    public func setDirtyTracking(enabled: Bool) throws(DeviceError) {
        var bitmap: IOMMUDirtyBitmap?
        if enabled {
            let made = engine.dirtyBitmap.withLock { b -> Result<IOMMUDirtyBitmap, SystemError> in
                if let b { return .success(b) }
                do throws(SystemError) { let n = try IOMMUDirtyBitmap(); b = n; return .success(n) } catch { return .failure(error) }
            }
            switch made {
            case .success(let b): bitmap = b
            case .failure(let e): throw DeviceError("enable dirty tracking on port \(portID): \(e)")
            }
        }
        let b = bitmap
        // Applied between two batches: once this returns, every later write is marked (on) or
        // none is (off).
        try apply(enabled ? "enable dirty tracking" : "disable dirty tracking") { e in e.dirty = b }
    }

    public func readAndClearDirty(iova: UInt64, length: UInt64, pageSize: UInt64,
                                  into bitmap: UnsafeMutableRawBufferPointer) throws(DeviceError) -> UInt64 {
        guard let b = engine.dirtyBitmap.withLock({ $0 }) else {
            guard pageSize == IOMMUDirtyBitmap.pageSize else { throw DeviceError("dirty bitmap: page size \(pageSize): this IOMMU tracks 4096-byte pages only") }
            return 0  // never tracked: nothing dirty
        }
        return try b.readAndClear(iova: iova, length: length, pageSize: pageSize, into: bitmap)
    }

    /// The dirty bitmap, once tracking was enabled (tests).
    public var dirtyBitmap: IOMMUDirtyBitmap? { engine.dirtyBitmap.withLock { $0 } }
}
