import Logging
import Platform
import Synchronization

/// Applies a tap's virtio-net header size and offloads (TUNSETVNETHDRSZ, TUNSETOFFLOAD) on a
/// thread of its own, never on the engine's or the caller's: both ioctls take the kernel's RTNL
/// lock, which the guest's own virtio-net driver holds while it waits for DRIVER_OK when the
/// device is exported through VDUSE to the same kernel (virtio_vdpa). Done inline, the engine
/// would wait on the driver, which waits on the device's reply, which waits on the engine.
/// Until a setting is applied the engine passes no frame between the guest and the tap (`ready`).
final class TapConfigurator: Sendable {
    struct Setting: Equatable, Sendable {
        var generation: UInt64
        var headerLength: Int
        var offloads: UInt32
    }

    let tap: TapDevice
    private let wanted: Mutex<Setting>
    private let applied = Atomic<UInt64>(0)
    private let stopping = Atomic<Bool>(false)
    private let wake: SharedFD
    /// The engine's wake eventfd: signalled once a setting is applied.
    private let engineWake: Mutex<SharedFD?> = Mutex(nil)
    private let thread: Mutex<OSThread?> = Mutex(nil)
    private let logger: Logger

    init(tap: TapDevice, headerLength: Int, logger: Logger) throws(SystemError) {
        self.tap = tap
        self.logger = logger
        // The tap is opened with this setting in place (applied inline at open: no guest yet).
        try tap.setVnetHeaderSize(headerLength)
        wanted = Mutex(Setting(generation: 0, headerLength: headerLength, offloads: 0))
        wake = SharedFD(try EventFD.make())
        let t = try OSThread(name: "tapcfg-\(tap.name)") { [self] in run() }
        thread.withLock { $0 = t }
    }

    func setEngineWake(_ fd: SharedFD) { engineWake.withLock { $0 = fd } }

    /// Asks for a new setting; returns its generation (the engine compares it with `applied`).
    func request(headerLength: Int, offloads: UInt32) -> UInt64 {
        let g = wanted.withLock { w -> UInt64 in
            w = Setting(generation: w.generation &+ 1, headerLength: headerLength, offloads: offloads)
            return w.generation
        }
        _ = EventFD.signal(wake.raw)
        return g
    }

    /// Whether setting `generation` (or a later one) is in place.
    @inline(__always)
    func isApplied(_ generation: UInt64) -> Bool { applied.load(ordering: .acquiring) >= generation }

    private func run() {
        while !stopping.load(ordering: .acquiring) {
            _ = try? Poll.waitReadable(wake.raw, until: nil)
            _ = EventFD.drain(wake.raw)
            let w = wanted.withLock { $0 }
            if w.generation <= applied.load(ordering: .relaxed) { continue }
            do throws(SystemError) {
                try tap.setVnetHeaderSize(w.headerLength)
                try tap.setOffloads(w.offloads)
            } catch {
                // Frames still flow: the kernel completes what the guest cannot take; a wrong
                // header size would garble them, hence the error level.
                logger.error("tap \(tap.name): \(error); frames to the guest may not match its offloads")
            }
            applied.store(w.generation, ordering: .releasing)
            if let e = engineWake.withLock({ $0 }) { _ = EventFD.signal(e.raw) }
        }
    }

    func stop() {
        stopping.store(true, ordering: .releasing)
        _ = EventFD.signal(wake.raw)
        thread.withLock { $0 }?.join()
    }
}
