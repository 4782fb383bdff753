import CVDPAShims
import DeviceFramework
import Logging
import Platform
import Synchronization
import VhostUser
import Virtio

/// `migration=iommu-dirty` figures of a port (stats JSON, `dirtyTracking`; docs/CONTROL.md).
/// Keys are added, never renamed.
public struct DirtyTrackingStats: Codable, Sendable, Equatable {
    /// The device records its writes (LOG_ALL is on).
    public var enabled = false
    /// Folds of the device's bits into the frontend's log, and the dirty pages they carried.
    public var folds: UInt64 = 0
    public var pagesFolded: UInt64 = 0
    /// Cost of the last and the longest fold (read-and-clear of every guest region + OR into the log).
    public var lastFoldMicros: UInt64 = 0
    public var maxFoldMicros: UInt64 = 0
    /// CPU time all folds took, on whichever thread ran them (the benchmark's CPU per packet).
    public var foldCPUNanos: UInt64 = 0
    /// The period of the background folds while tracking is on (0: none).
    public var periodMillis: Int = 0
    /// Pages read from the device and dropped by the test switch VDPAD_TEST_SKIP_DIRTY_FOLD.
    public var pagesDropped: UInt64 = 0
    public init() {}
}

/// Folds a dirty-tracking device's bitmap into the frontend's dirty log (`migration=iommu-dirty`):
/// for each guest memory region, read-and-clear the device's bits (IOMMU_HWPT_GET_DIRTY_BITMAP's
/// shape, `DirtyTrackingDevice`), then OR them into the log (atomic per word, as QEMU clears
/// the log concurrently). A fold runs every `periodMillis` on the folder's own thread while
/// tracking is on, and on the port's thread whenever correctness needs one before a reply:
/// before GET_VRING_BASE is answered, before a new SET_LOG_BASE replaces the log (into the old
/// one: QEMU syncs the old log after our reply, then frees it), after tracking is disabled when
/// LOG_ALL goes off, and before the memory table changes (the old regions' bits).
///
/// Why this is complete with QEMU's order: at the end of a migration QEMU stops the VM, then
/// stops the vhost device (vhost_dev_stop: GET_VRING_BASE for each ring), then syncs our log a
/// last time (vhost_log_put(dev, true), and the final migration_bitmap_sync) before sending the
/// last dirty pages. The device writes nothing to a ring after GET_VRING_BASE answers, and every
/// write before it set its bit before the answer (the device marks after writing, with release;
/// the fold reads with acquire) and was folded before the answer. So every page the device wrote
/// is in the log before QEMU's last sync reads it. Bits a fold reads while the device runs are
/// ORed in early: a page written again after a fold sets its bit again, which the next fold (at
/// the latest the one before GET_VRING_BASE) carries. The background period only bounds how long
/// a dirty page waits in the device before QEMU's iterations can see it (it shortens the last
/// iteration); it plays no part in correctness.
///
/// While no usable log exists (LOG_ALL before SET_LOG_BASE, or the log QEMU freed when it
/// stopped the device), folds leave the bits in the device: they wait there for the next log,
/// so a ring never runs unlogged (invariant 6) and nothing needs holding.
final class DirtyFolder: @unchecked Sendable {
    // @unchecked Sendable: `scratch` is touched only under `state`'s lock; everything else is
    // immutable, atomic or in the Mutex.
    struct State {
        var enabled = false
        var log: DirtyLog?
        var regions: [(gpa: UInt64, size: UInt64)] = []
        var thread: OSThread?
    }

    let device: any DirtyTrackingDevice
    let portID: String
    let periodMillis: Int
    let skipFold: Bool
    let logger: Logger
    let table: MigrationStatsTable
    private let state = Mutex(State())
    private let stopping = Atomic<Bool>(false)
    private let wake: SharedFD
    /// The bitmap a fold reads into: 8 KiB, 65536 pages (256 MiB of guest memory) per device call.
    static let chunkPages: UInt64 = 65_536
    private let scratch: UnsafeMutableRawBufferPointer

    /// The default period. QEMU syncs the log once per iteration (hundreds of ms apart while RAM
    /// is copied, then once more after stopping the device), so the device's pages need only be
    /// in the log a little before each sync; correctness never depends on the period (see above).
    /// Measured (IOMMUDirtyBitmapTests.testFoldIntoTheLogAndItsCost, debug build, this 2-core
    /// machine): a fold with 1000 dirty pages costs about 0.23 ms for a 1 GiB guest and 0.93 ms
    /// for 4 GiB (0.10 / 0.27 ms with none dirty: the scan of 32 / 128 KiB of bits). At 20 ms that
    /// is at most 1 % / 5 % of one core in a debug build, while tracking is on only; a release
    /// build costs less (not measured here).
    static let defaultPeriodMillis = 20

    init(device: any DirtyTrackingDevice, portID: String, periodMillis: Int = DirtyFolder.defaultPeriodMillis,
         skipFold: Bool, stats table: MigrationStatsTable, logger: Logger) throws(SystemError) {
        self.device = device
        self.portID = portID
        self.periodMillis = periodMillis
        self.skipFold = skipFold
        self.table = table
        self.logger = logger
        wake = SharedFD(try EventFD.make())
        scratch = .allocate(byteCount: Int(Self.chunkPages / 8), alignment: 8)
        scratch.initializeMemory(as: UInt8.self, repeating: 0)
        var s = DirtyTrackingStats()
        s.periodMillis = periodMillis
        table.dirtyTracking.withLock { $0 = s }
    }

    deinit {
        close()
        scratch.deallocate()
    }

    /// LOG_ALL on: the device records from now on (every write after this returns is marked).
    /// The background thread starts with the first enable.
    func enable() throws(DeviceError) {
        try state.withLock { (s: inout State) throws(DeviceError) in
            if !s.enabled { try device.setDirtyTracking(enabled: true) }
            s.enabled = true
            if s.thread == nil {
                do throws(SystemError) {
                    s.thread = try OSThread(name: "dirty-\(portID)") { [self] in run() }
                } catch {
                    // The folds that correctness needs run on the port's thread anyway.
                    logger.warning("dirty folder thread not started (\(error)): folds happen only at GET_VRING_BASE, SET_LOG_BASE and LOG_ALL off")
                }
            }
        }
        table.dirtyTracking.withLock { $0?.enabled = true }
        _ = EventFD.signal(wake.raw)
    }

    /// LOG_ALL off: tracking off first, then one last fold into the log, so every write the
    /// device made while it tracked reaches the log (a fold before disabling would miss the
    /// writes between the two). Without a log the bits are read and dropped: nobody logs now.
    func disable(_ request: String) throws(DeviceError) {
        try state.withLock { (s: inout State) throws(DeviceError) in
            guard s.enabled else { return }
            try device.setDirtyTracking(enabled: false)
            s.enabled = false
            try foldLocked(&s, request, dropWithoutLog: true)
            s.log = nil
        }
        table.dirtyTracking.withLock { $0?.enabled = false }
    }

    /// The log to fold into (nil: none usable; bits wait in the device). A different log takes
    /// over only after a fold into the one it replaces.
    func setLog(_ log: DirtyLog?, _ request: String) throws(DeviceError) {
        try state.withLock { (s: inout State) throws(DeviceError) in
            guard s.log !== log else { return }
            try foldLocked(&s, request, dropWithoutLog: false)
            s.log = log
        }
    }

    /// The guest's memory changed: the old regions' bits are folded first (the device no longer
    /// writes them: it took the new table before this is called), then the new regions are read.
    func setRegions(_ regions: [GuestMemoryView.Region], _ request: String) throws(DeviceError) {
        try state.withLock { (s: inout State) throws(DeviceError) in
            try foldLocked(&s, request, dropWithoutLog: false)
            s.regions = regions.map { (gpa: $0.gpa, size: $0.size) }
        }
    }

    /// Folds now (GET_VRING_BASE and the background thread).
    func fold(_ request: String) throws(DeviceError) {
        try state.withLock { (s: inout State) throws(DeviceError) in try foldLocked(&s, request, dropWithoutLog: false) }
    }

    /// The connection went or the device is reset: tracking off, the bits folded into the log if
    /// one is usable (best effort), then forgotten.
    func reset() {
        do throws(DeviceError) {
            try state.withLock { (s: inout State) throws(DeviceError) in
                if s.enabled { try device.setDirtyTracking(enabled: false) }
                s.enabled = false
                try foldLocked(&s, "reset", dropWithoutLog: true)
                s.log = nil
                s.regions = []
            }
        } catch { logger.error("reset: dirty tracking: \(error)") }
        table.dirtyTracking.withLock { $0?.enabled = false }
    }

    /// Stops the background thread.
    func close() {
        stopping.store(true, ordering: .releasing)
        _ = EventFD.signal(wake.raw)
        let t = state.withLock { s -> OSThread? in let t = s.thread; s.thread = nil; return t }
        t?.join()
    }

    /// Reads and clears the device's bits for every region, ORs them into the log. Without a log,
    /// the bits stay in the device, unless `dropWithoutLog` (logging has ended).
    private func foldLocked(_ s: inout State, _ request: String, dropWithoutLog: Bool) throws(DeviceError) {
        guard s.log != nil || dropWithoutLog else { return }
        let t0 = MonotonicClock.nanoseconds
        let cpu0 = cvdpa_thread_cpu_ns()
        var pages: UInt64 = 0
        var dropped: UInt64 = 0
        let pageSize = DirtyLog.pageSize
        for r in s.regions where r.size > 0 {
            // Whole pages covering the region (a superset at unaligned edges).
            let start = r.gpa & ~(pageSize - 1)
            let end = (r.gpa &+ r.size &+ pageSize &- 1) & ~(pageSize - 1)
            var at = start
            while at < end {
                let length = min(end - at, Self.chunkPages * pageSize)
                let n = try device.readAndClearDirty(iova: at, length: length, pageSize: pageSize, into: scratch)
                if n > 0 {
                    let words = Int((length / pageSize + 63) / 64)
                    if let log = s.log, !skipFold {
                        log.or(bitmap: UnsafeRawPointer(scratch.baseAddress!), wordCount: words, firstPage: at / pageSize)
                        pages &+= n
                    } else {
                        dropped &+= n
                    }
                    // Safety: words * 8 <= chunkPages / 8 bytes, the scratch buffer's size.
                    scratch.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: words * 8)
                }
                at &+= length
            }
        }
        let micros = (MonotonicClock.nanoseconds - t0) / 1000
        let cpu = cvdpa_thread_cpu_ns() &- cpu0
        table.dirtyTracking.withLock {
            $0?.foldCPUNanos &+= cpu
            $0?.folds &+= 1
            $0?.pagesFolded &+= pages
            $0?.pagesDropped &+= dropped
            $0?.lastFoldMicros = micros
            if micros > $0?.maxFoldMicros ?? 0 { $0?.maxFoldMicros = micros }
        }
        if dropped > 0 && skipFold { logger.critical("TEST SWITCH VDPAD_TEST_SKIP_DIRTY_FOLD: \(request): dropped \(dropped) dirty page(s) instead of logging them") }
    }

    /// The background folds: every `periodMillis` while tracking is on, asleep otherwise.
    /// The wait between two background folds is at least ten times the last one's cost, so that
    /// they take at most a tenth of a core however much memory the guest declares (a fold reads
    /// one bitmap word per 64 pages of every region, dirty or not).
    private func run() {
        var lastFoldSeconds = 0.0
        while !stopping.load(ordering: .acquiring) {
            let on = state.withLock { $0.enabled } && periodMillis > 0
            let wait = max(Double(periodMillis) / 1000, 10 * lastFoldSeconds)
            do {
                _ = try Poll.waitReadable(wake.raw, until: on ? Deadline(secondsFromNow: wait) : nil)
            } catch {
                logger.error("dirty folder: \(error)")
                CurrentThread.sleep(milliseconds: UInt32(min(max(periodMillis, 1), 1000)))
            }
            _ = EventFD.drain(wake.raw)
            if stopping.load(ordering: .acquiring) { break }
            // Period 0: no background folds at all, not even when a wake-up (tracking turned on)
            // ends the wait; only the folds that replies need.
            if periodMillis == 0 { continue }
            let t0 = MonotonicClock.nanoseconds
            defer { lastFoldSeconds = Double(MonotonicClock.nanoseconds - t0) / 1e9 }
            do throws(DeviceError) {
                try state.withLock { (s: inout State) throws(DeviceError) in
                    if s.enabled { try foldLocked(&s, "periodic fold", dropWithoutLog: false) }
                }
            } catch {
                logger.error("dirty folder: periodic fold: \(error)")
            }
        }
    }
}
