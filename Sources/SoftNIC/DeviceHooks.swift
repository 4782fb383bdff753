import DeviceFramework
import Virtio

/// Raises a ring's interrupt where there is no call eventfd to signal: a SoftNIC that the kernel
/// drives through VDUSE raises interrupts with an ioctl on the VDUSE device. Called on the DMA
/// engine's thread, once per published batch that needs an interrupt (never per frame); it must
/// neither block nor allocate.
public protocol InterruptRaiser: AnyObject, Sendable {
    /// Raises ring `index`'s interrupt. False when it could not (the raiser counts why).
    func raise(ring index: Int) -> Bool
}

/// Maps IOVA ranges on demand. A kernel driver can map memory for the device without telling it
/// by a message (VDUSE's bounce buffer appears at the driver's first DMA map, which may come
/// after DRIVER_OK), so an access that misses the IOMMU asks here before the ring faults. Only
/// a miss costs anything: the data path translates exactly as before.
public protocol IOMMUMissResolver: AnyObject, Sendable {
    /// Called on the DMA engine's thread when a device access to [iova, iova + length) finds no
    /// mapping. Returns the device's whole memory with more mapped than before (the engine takes
    /// it and retries the access), or nil when nothing more can be mapped (the ring faults). Must
    /// not wait for the engine (it runs on it).
    func resolve(iova: UInt64, length: UInt64) -> DeviceMemory?
}

/// An IOVA range that missed the IOMMU.
struct IOVARange: Equatable {
    var iova: UInt64
    var length: UInt64
}

extension ChainError {
    /// The range whose translation failed, when that is why the chain was refused.
    var unmappedRange: IOVARange? {
        switch self {
        case .bufferOutOfRange(let gpa, let length), .indirectTableOutOfRange(let gpa, let length):
            IOVARange(iova: gpa, length: UInt64(length))
        default:
            nil
        }
    }
}
