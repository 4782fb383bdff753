import Synchronization
import DeviceFramework

/// Why the device dropped a frame.
public enum DropReason: Int, CaseIterable, Sendable {
    case noBuffer = 0, bufferTooSmall, frameTooLarge, runt, linkError
    /// A TX frame whose virtio-net header is malformed or asks for an offload the guest did not
    /// negotiate (gso_size 0 with a GSO type, csum_start beyond the frame, hdr_len past its end).
    case badHeader
    /// A large (GSO) frame the device had to segment in software and could not: not TCP or UDP
    /// over IPv4 or IPv6 as its header said.
    case badOffload
    public var name: String {
        switch self {
        case .noBuffer: "noBuffer"
        case .bufferTooSmall: "bufferTooSmall"
        case .frameTooLarge: "frameTooLarge"
        case .runt: "runt"
        case .linkError: "linkError"
        case .badHeader: "badHeader"
        case .badOffload: "badOffload"
        }
    }
}

/// One queue's counters. The DMA engine adds to them once per batch (relaxed: they are
/// statistics, read by the control thread without ordering needs).
public final class QueueCounterSet: Sendable {
    public let index: Int
    let packets = Atomic<UInt64>(0)
    let bytes = Atomic<UInt64>(0)
    let faults = Atomic<UInt64>(0)
    let interrupts = Atomic<UInt64>(0)
    let doorbells = Atomic<UInt64>(0)
    let dropNoBuffer = Atomic<UInt64>(0)
    let dropBufferTooSmall = Atomic<UInt64>(0)
    let dropFrameTooLarge = Atomic<UInt64>(0)
    let dropRunt = Atomic<UInt64>(0)
    let dropLinkError = Atomic<UInt64>(0)
    let dropBadHeader = Atomic<UInt64>(0)
    let dropBadOffload = Atomic<UInt64>(0)
    let errorText = Mutex<String?>(nil)
    /// RX frames read from the tap straight into the guest's buffers (not in the stats JSON:
    /// for tests and benchmarks, which compare the two tap paths).
    let tapDirect = Atomic<UInt64>(0)

    init(index: Int) {
        self.index = index
    }

    func dropCount(_ r: DropReason) -> UInt64 {
        switch r {
        case .noBuffer: dropNoBuffer.load(ordering: .relaxed)
        case .bufferTooSmall: dropBufferTooSmall.load(ordering: .relaxed)
        case .frameTooLarge: dropFrameTooLarge.load(ordering: .relaxed)
        case .runt: dropRunt.load(ordering: .relaxed)
        case .linkError: dropLinkError.load(ordering: .relaxed)
        case .badHeader: dropBadHeader.load(ordering: .relaxed)
        case .badOffload: dropBadOffload.load(ordering: .relaxed)
        }
    }

    @inline(__always) func add(packets p: UInt64, bytes b: UInt64) {
        if p > 0 {
            packets.wrappingAdd(p, ordering: .relaxed)
            bytes.wrappingAdd(b, ordering: .relaxed)
        }
    }
    func drop(_ r: DropReason, _ n: UInt64 = 1) {
        switch r {
        case .noBuffer: dropNoBuffer.wrappingAdd(n, ordering: .relaxed)
        case .bufferTooSmall: dropBufferTooSmall.wrappingAdd(n, ordering: .relaxed)
        case .frameTooLarge: dropFrameTooLarge.wrappingAdd(n, ordering: .relaxed)
        case .runt: dropRunt.wrappingAdd(n, ordering: .relaxed)
        case .linkError: dropLinkError.wrappingAdd(n, ordering: .relaxed)
        case .badHeader: dropBadHeader.wrappingAdd(n, ordering: .relaxed)
        case .badOffload: dropBadOffload.wrappingAdd(n, ordering: .relaxed)
        }
    }
    func fault(_ text: String) {
        faults.wrappingAdd(1, ordering: .relaxed)
        errorText.withLock { $0 = text }
    }

    var snapshot: QueueCounters {
        var d: [String: UInt64] = [:]
        for r in DropReason.allCases { d[r.name] = dropCount(r) }
        return QueueCounters(index: index, packets: packets.load(ordering: .relaxed), bytes: bytes.load(ordering: .relaxed),
                             drops: d, faults: faults.load(ordering: .relaxed), error: errorText.withLock { $0 },
                             interrupts: interrupts.load(ordering: .relaxed), doorbells: doorbells.load(ordering: .relaxed))
    }
}
