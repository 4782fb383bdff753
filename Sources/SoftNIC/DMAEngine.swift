import Glibc
import Logging
import Platform
import Synchronization
import DeviceFramework
import Virtio

/// The SoftNIC's DMA engine: one thread that serves the guest's split rings directly through the
/// IOMMU, like a vDPA NIC's hardware queues. It polls while there is work and sleeps on the
/// doorbells (the guest's kick eventfds) when idle, with notifications re-enabled first.
/// Everything but its `ConfinedWorker` is confined to the engine's thread.
///
/// By job, one file each: this one (state, thread, control entry points), DMAEngine+Control
/// (control operations), DMAEngine+Loop (the loop, sleeping, publishing), DMAEngine+TX (guest →
/// link), DMAEngine+RX (link → guest, through `RXWriter`), and `HostLink` (tap, wire, generator).
final class DMAEngine: ConfinedTarget, @unchecked Sendable {
    // @unchecked Sendable: the worker is Sendable; every other field is touched only on the
    // engine thread (or before it starts). A control operation that timed out may still run
    // later, but on the engine thread, like any other.
    let logger: Logger
    let portID: String
    let rings: [EngineRing]
    let link: HostLink
    /// Where interrupts go for rings without a call eventfd (VDUSE), and who maps IOMMU misses.
    let raiser: (any InterruptRaiser)?
    let missResolver: (any IOMMUMissResolver)?
    private let worker: ConfinedWorker<DMAEngine>
    var wake: SharedFD { worker.wake }

    // Device state (engine thread).
    var iommu = IOMMUTable.empty
    /// Guest buffers translate here (guest memory only, see IOMMUTable).
    var view = IOMMUTable.empty.guestView
    /// Ring areas translate here (guest memory plus the daemon's mediated rings).
    var ringView = IOMMUTable.empty.view
    var memory = DeviceMemory.empty
    var extraMappings: [UInt64: IOVAMapping] = [:]
    var eventIdx = false
    var mergeable = false
    var indirect = false
    var headerLength = 12
    /// The negotiated features: which offloads the guest may ask for in TX headers (CSUM,
    /// HOST_*) and which it takes on RX (GUEST_*).
    var features: UInt64 = 0
    /// Bumped whenever a ring's translation may have changed (memory, start, stop, redirect,
    /// fault): the tap's RX window is valid only for the generation it was built in.
    var translationGeneration: UInt64 = 0
    /// TX chains' readable buffers as an iovec list, for one writev to the tap.
    let txIOV: UnsafeMutablePointer<iovec>
    static let txIOVCapacity = 1024
    /// Segments of a large frame the device cuts in software are written here, one at a time.
    let segmentBuffer: UnsafeMutableRawPointer
    /// Segments of the wire's first frame already delivered (a frame cut in software waits on the
    /// wire, part delivered, until the guest posts buffers for the rest).
    var wireResume = 0
    /// The last `deliver` that returned false found no buffer posted (rather than buffers too
    /// small, or a fault): see `waits`.
    var waitingForBuffers = false
    /// The tap setting the negotiated features asked for (TapConfigurator's generation).
    var tapWanted: UInt64 = 0
    /// The tap setting last asked for (nil: none yet, the tap has what it was opened with).
    var tapSetting: (headerLength: Int, offloads: UInt32)?
    var active: [EngineRing] = []
    /// The IOMMU's dirty bits while dirty tracking is on (nil: off, and every write skips
    /// marking with one branch). See DMAEngine+Dirty.swift.
    var dirty: IOMMUDirtyBitmap?
    /// The dirty bitmap, made at the first enable and kept (readers on other threads use it).
    let dirtyBitmap = Mutex<IOMMUDirtyBitmap?>(nil)
    /// Test-only (VDPAD_TEST_JOURNAL): while dirty tracking is on, every RX range the device
    /// wrote is journaled before the used index that exposes it is published (`journalRX`).
    /// Nil otherwise: the publish path then costs nothing more than with tracking on.
    let journal: (any DeviceWriteJournal)?
    var activeRX: [EngineRing] = []
    /// Round-robin over the RX rings for frames from a tap or a wire.
    var rxRoundRobin = 0

    /// The device's frame buffer (preallocated once): TX frames are gathered here, tap frames
    /// read here (with their virtio-net header when read from the tap).
    let frameBuffer: UnsafeMutableRawPointer
    static let frameBufferSize = 131_072
    let epoll: Epoll

    static let batch = 64
    /// IOMMU misses resolved for one chain or frame before the ring faults anyway (each resolution
    /// maps at least one more range, so a chain needs at most one per buffer it spans).
    static let maxMissResolutions = 16
    /// How long the engine keeps polling after its last work before it sleeps.
    static let pollNanos: UInt64 = 200_000
    static let wakeToken: UInt64 = 0
    static let tapToken: UInt64 = 1
    static let wireToken: UInt64 = 2
    static let kickTokenBase: UInt64 = 16

    init(portID: String, link spec: LinkSpec, ringCount: Int, macOwn: UInt64, macGuest: UInt64, stats: [QueueCounterSet],
         raiser: (any InterruptRaiser)?, missResolver: (any IOMMUMissResolver)?, journal: (any DeviceWriteJournal)? = nil,
         logger: Logger) throws {
        self.portID = portID
        self.journal = journal
        self.raiser = raiser
        self.missResolver = missResolver
        self.logger = logger
        rings = (0..<ringCount).map { EngineRing(index: $0, stats: stats[$0]) }
        link = try HostLink(spec, portID: portID, macOwn: macOwn, macGuest: macGuest, logger: logger)
        worker = try ConfinedWorker(name: "dma-\(portID)")
        epoll = try Epoll(capacity: 64)
        frameBuffer = .allocate(byteCount: Self.frameBufferSize, alignment: 64)
        segmentBuffer = .allocate(byteCount: Self.frameBufferSize, alignment: 64)
        txIOV = .allocate(capacity: Self.txIOVCapacity)
        try epoll.add(wake.raw, token: Self.wakeToken)
        if let tap = link.tap { try epoll.add(tap.raw, token: Self.tapToken) }
        link.tapConfig?.setEngineWake(wake)
        if let wire = link.wireIn { try epoll.add(wire.wake.raw, token: Self.wireToken) }
    }

    deinit {
        frameBuffer.deallocate()
        segmentBuffer.deallocate()
        txIOV.deallocate()
    }

    func start() throws(SystemError) {
        try worker.start(self)
    }

    /// Runs `body` on the engine thread and returns its value: control operations are applied
    /// between batches, never in the middle of one. Throws at once on an engine that has stopped.
    func perform<R: Sendable>(_ body: @escaping @Sendable (DMAEngine) -> R) throws(WorkerError) -> R {
        do { return try worker.perform(body) } catch {
            logger.warning("DMA engine of \(portID): control operation not applied: \(error)")
            throw error
        }
    }

    func stop() {
        // Bounded: a thread blocked on a frontend's fd is interrupted (ConfinedWorker); one that
        // still does not answer must not hold the port's or the daemon's shutdown: it is
        // abandoned, loudly, and ends with the process.
        if !worker.stop() {
            logger.error("DMA engine thread did not stop within \(2 * worker.timeoutSeconds) s (blocked on a frontend's fd?); abandoning it")
        }
    }

    /// After the engine was interrupted out of a system call (it blocked on a frontend's eventfd,
    /// which the frontend made blocking again after handing it over): every ring whose call or kick
    /// eventfd is blocking now stops using it and faults, so the engine cannot block on it again.
    /// Called where an interrupted write is seen, and before running posted operations after an
    /// interrupt (a blocked read shows no error of its own).
    func quarantineBlockingFDs() {
        for r in rings where r.config != nil {
            var which: [String] = []
            if r.callFD >= 0 && !EventFD.isNonBlocking(r.callFD) {
                which.append("call")
                r.callFD = -1
                r.call = nil
                r.raises = false
            }
            if let k = r.kick, !EventFD.isNonBlocking(k.raw) {
                which.append("kick")
                epoll.remove(k.raw)
                r.kick = nil
            }
            if !which.isEmpty {
                fault(r, "the frontend made the ring's \(which.joined(separator: " and ")) eventfd blocking again after handing it over")
            }
        }
    }
}
