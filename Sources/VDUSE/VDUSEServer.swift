#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import DeviceFramework
import Logging
import Platform
import SoftNIC
import Synchronization
import Virtio

/// Raises a VDUSE device's ring interrupts for the SoftNIC: VDUSE_VQ_INJECT_IRQ, straight from
/// the DMA engine's thread, once per published batch that needs an interrupt. No thread and no
/// eventfd in between (the kernel then signals vhost-vdpa's call eventfd itself, or queues
/// virtio_vdpa's callback), nothing allocated.
public final class VDUSEInterrupts: InterruptRaiser {
    private let device: any VDUSEDeviceIO
    public let raised = Atomic<UInt64>(0)
    /// Injections the kernel refused, and the last errno: EINVAL before DRIVER_OK is set (the
    /// loop raises every started ring once after answering DRIVER_OK, for such a loss), EPERM
    /// once the device is broken.
    public let failed = Atomic<UInt64>(0)
    public let lastErrno = Atomic<Int32>(0)

    public init(device: any VDUSEDeviceIO) { self.device = device }

    public func raise(ring index: Int) -> Bool {
        let e = device.injectInterrupt(index)
        guard e == 0 else {
            failed.wrappingAdd(1, ordering: .relaxed)
            lastErrno.store(e, ordering: .relaxed)
            return false
        }
        raised.wrappingAdd(1, ordering: .relaxed)
        return true
    }
}

/// Serves a VDUSE device's requests on its own thread (a `ConfinedWorker`): reads the kernel's
/// requests from the device's fd, applies each to the SoftNIC (through the `VDPADevice`
/// operations) and answers it. The kernel's caller waits for each answer (30 s by default, the
/// device's msg_timeout in sysfs; then it marks the device broken and every later request and
/// ioctl fails), so nothing here waits for long: the device's operations are bounded like every
/// control operation (`ConfinedWorker`).
///
/// - SET_STATUS with DRIVER_OK: the negotiated features (VDUSE_DEV_GET_FEATURES, which must lie
///   within those offered), then each ready ring (VDUSE_VQ_GET_INFO: size checked, areas mapped),
///   the memory, the kick eventfds (VDUSE_VQ_SETUP_KICKFD: a reset makes the kernel forget
///   them), the rings started at the avail index the driver set. After answering, every started
///   ring's interrupt is raised once: one raised before the kernel had taken DRIVER_OK was refused.
/// - SET_STATUS 0: the SoftNIC is reset and every IOTLB window dropped.
/// - GET_VQ_STATE: a running ring is stopped (`stopRing`: it completes what it took and touches
///   the ring no more) and its next avail index answered; the vhost-vdpa driver takes that as
///   GET_VRING_BASE, resets the device and programs it again from there. A ring that is not
///   running answers where it stopped, or the index the driver set.
/// - UPDATE_IOTLB: the IOTLB's windows in the range are brought up to date and the SoftNIC gets
///   the new memory before the answer (so it touches no unmapped range afterwards).
/// - A fault the SIGBUS guard absorbed in a window: the window is dropped (looked up again later).
final class VDUSEServer: ConfinedTarget, @unchecked Sendable {
    // @unchecked Sendable: the mutable state (status, rings) is touched only on the worker's
    // thread; the rest is immutable and Sendable.
    enum RingState: Equatable {
        case idle
        case running
        case stopped(at: UInt16)
        /// Not started: the driver programmed it so that the device cannot serve it.
        case refused
    }

    let name: String
    let device: any VDUSEDeviceIO
    let nic: any VDPADevice
    let iotlb: VDUSEIOTLB
    let interrupts: VDUSEInterrupts?
    let kicks: [SharedFD]
    let offeredFeatures: UInt64
    let maxQueueSize: UInt16
    let logger: Logger

    private(set) var status: UInt8 = 0
    private(set) var rings: [RingState]
    /// Requests answered OK and FAILED (any thread may read them).
    let answered = Atomic<UInt64>(0)
    let refused = Atomic<UInt64>(0)
    /// The device status last taken (any thread may read it).
    let currentStatus = Atomic<UInt8>(0)
    /// Set once the kernel marked the device broken.
    let broken = Atomic<Bool>(false)

    init(name: String, device: any VDUSEDeviceIO, nic: any VDPADevice, iotlb: VDUSEIOTLB, interrupts: VDUSEInterrupts?,
         kicks: [SharedFD], offeredFeatures: UInt64, maxQueueSize: UInt16, logger: Logger) {
        self.name = name
        self.device = device
        self.nic = nic
        self.iotlb = iotlb
        self.interrupts = interrupts
        self.kicks = kicks
        self.offeredFeatures = offeredFeatures
        self.maxQueueSize = maxQueueSize
        self.logger = logger
        rings = Array(repeating: .idle, count: kicks.count)
    }

    var queueCount: Int { kicks.count }

    static let wakeToken: UInt64 = 0
    static let deviceToken: UInt64 = 1
    static let faultToken: UInt64 = 2

    func run(on worker: ConfinedWorker<VDUSEServer>) {
        let epoll: Epoll
        do { epoll = try makeEpoll(wake: worker.wake.raw) } catch {
            logger.critical("VDUSE \(name): cannot watch the device: \(error); its requests go unanswered")
            return
        }
        // Safety: one request's bytes, owned by this loop alone and freed when it ends.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: VDUSEMessage.requestSize, alignment: 8)
        defer { buffer.deallocate() }
        var watching = true
        while !worker.stopRequested {
            if worker.hasPending { worker.runPending(self); continue }
            var readable = false, failed = false, faulted = false
            do {
                try epoll.wait(timeoutMillis: -1) { ev in
                    switch ev.token {
                    case Self.wakeToken: EventFD.drain(worker.wake.raw)
                    case Self.faultToken: EventFD.drain(iotlb.faultNotify.raw); faulted = true
                    default:
                        if ev.events & CVDPA_EPOLLERR != 0 { failed = true } else { readable = true }
                    }
                }
            } catch {
                // epoll_wait fails only on a bug (EBADF, EINVAL): say so, and do not spin on it.
                logger.error("VDUSE \(name): \(error)")
                CurrentThread.sleep(milliseconds: 1)
            }
            if faulted { dropFaultedWindows() }
            if failed && watching {
                watching = false
                epoll.remove(device.messageFD)
                deviceBroken()
            } else if readable && watching {
                if !serveRequests(buffer) {
                    watching = false
                    epoll.remove(device.messageFD)
                }
            }
        }
    }

    private func makeEpoll(wake: Int32) throws(SystemError) -> Epoll {
        let epoll = try Epoll(capacity: 8)
        try epoll.add(wake, token: Self.wakeToken)
        try epoll.add(device.messageFD, token: Self.deviceToken)
        try epoll.add(iotlb.faultNotify.raw, token: Self.faultToken)
        return epoll
    }

    func quarantineBlockingFDs() {}  // every fd here is the daemon's own, non-blocking

    /// Reads and answers every waiting request. False when the fd reached its end (a test's fake
    /// device closed it): it is not watched any more.
    func serveRequests(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        while true {
            // Safety: read writes at most buffer.count bytes into the loop's buffer.
            let n = Self.readRaw(device.messageFD, buffer.baseAddress!, buffer.count)
            if n < 0 {
                let e = cvdpa_errno()
                if e == EINTR { continue }
                if e != EAGAIN { logger.error("VDUSE \(name): \(SystemError("read(\(name))", errno: e))") }
                return true
            }
            if n == 0 { return false }
            // Safety: 0 < n <= buffer.count, and read just wrote those n bytes.
            guard let m = VDUSEMessage.decode(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) else {
                logger.error("VDUSE \(name): a \(n)-byte read is no request (\(VDUSEMessage.requestSize) bytes expected)")
                continue
            }
            let (reply, afterwards) = handle(m)
            // Safety: the reply's 152 bytes are valid for the call; errno is read before anything else runs.
            let (w, e) = reply.withUnsafeBytes { b in (Self.writeRaw(device.messageFD, b.baseAddress!, b.count), cvdpa_errno()) }
            if w != reply.count {
                // ENOENT: the kernel no longer waits for this request (it timed out).
                logger.error("VDUSE \(name): answering request \(m.id) (\(m.request)): \(SystemError("write", errno: e))")
            }
            afterwards?()
        }
    }

    // Safety: callers pass a buffer of at least `n` bytes, valid for the call.
    @inline(never) static func readRaw(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Int { read(fd, p, n) }
    @inline(never) static func writeRaw(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int { write(fd, p, n) }

    /// The answer to one request, and what to do once it is written.
    func handle(_ m: VDUSEMessage.Decoded) -> ([UInt8], (() -> Void)?) {
        var ok = false
        var queue: UInt32 = 0
        var avail: UInt16 = 0
        var afterwards: (() -> Void)?
        switch m.request {
        case .setStatus(let s):
            (ok, afterwards) = setStatus(s)
        case .getQueueState(let index):
            queue = index
            if let at = queueState(Int(index)) { ok = true; avail = at }
        case .updateIOTLB(let first, let last):
            ok = updateIOTLB(first: first, last: last)
        case .unknown(let type):
            logger.warning("VDUSE \(name): unknown request type \(type); answered FAILED")
        }
        if ok { answered.wrappingAdd(1, ordering: .relaxed) } else { refused.wrappingAdd(1, ordering: .relaxed) }
        return (VDUSEMessage.response(id: m.id, ok: ok, queue: queue, availIndex: avail), afterwards)
    }

    // MARK: requests

    func setStatus(_ s: UInt8) -> (Bool, (() -> Void)?) {
        if s == 0 {
            reset()
            logger.info("VDUSE \(name): reset")
            return (true, nil)
        }
        let driverOK = VDUSEMessage.statusDriverOK
        var afterwards: (() -> Void)?
        if s & driverOK != 0 && status & driverOK == 0 {
            guard start() else { return (false, nil) }
            let started = rings.indices.filter { rings[$0] == .running }
            if let interrupts {
                afterwards = { for i in started { _ = interrupts.raise(ring: i) } }
            }
        } else if s & driverOK == 0 && status & driverOK != 0 {
            // Only a reset may clear DRIVER_OK; a driver that does so anyway is served no more.
            logger.warning("VDUSE \(name): status 0x\(String(s, radix: 16)) clears DRIVER_OK without a reset; rings stopped")
            stopRunningRings()
        }
        status = s
        currentStatus.store(s, ordering: .relaxed)
        return (true, afterwards)
    }

    /// DRIVER_OK: features, rings, memory, kicks; the rings started. False (the status write is
    /// refused) when the features are not the device's, a ready ring is not servable, or the
    /// SoftNIC cannot apply them; rings already started are then stopped again.
    func start() -> Bool {
        if startRings() { return true }
        stopRunningRings()
        return false
    }

    private func startRings() -> Bool {
        let features: UInt64
        do { features = try device.negotiatedFeatures() } catch {
            logger.error("VDUSE \(name): DRIVER_OK: \(error)")
            return false
        }
        guard features & ~offeredFeatures == 0 else {
            logger.error("VDUSE \(name): DRIVER_OK refused: the driver set features \(describeFeatures(features & ~offeredFeatures)) that the device does not offer")
            return false
        }
        do { try nic.setFeatures(features) } catch {
            logger.error("VDUSE \(name): DRIVER_OK: \(error)")
            return false
        }
        var configs: [VDPARingConfig] = []
        for i in 0..<queueCount {
            let info: VDUSEQueueInfo
            do { info = try device.queueInfo(i) } catch {
                logger.error("VDUSE \(name): DRIVER_OK: \(error)")
                return false
            }
            guard info.ready else { rings[i] = .idle; continue }
            guard let size = UInt16(exactly: info.size), size <= maxQueueSize, let layout = SplitRingLayout(queueSize: size) else {
                // A ready ring the device cannot serve: DRIVER_OK is refused (the driver sees the
                // status without it), rather than answered while a ring silently never runs.
                logger.error("VDUSE \(name): DRIVER_OK refused: ring \(i) is ready with size \(info.size), not a power of two in 1...\(maxQueueSize)")
                rings[i] = .refused
                return false
            }
            iotlb.ensureMapped(iova: info.descriptorIOVA, length: UInt64(layout.descriptorTableBytes))
            iotlb.ensureMapped(iova: info.driverIOVA, length: UInt64(layout.availRingBytes))
            iotlb.ensureMapped(iova: info.deviceIOVA, length: UInt64(layout.usedRingBytes))
            configs.append(VDPARingConfig(index: i, size: size, descGPA: info.descriptorIOVA, availGPA: info.driverIOVA,
                                          usedGPA: info.deviceIOVA, base: info.availIndex, kick: kicks[i], call: nil, enabled: true))
        }
        do { try nic.setMemory(iotlb.snapshot()) } catch {
            logger.error("VDUSE \(name): DRIVER_OK: \(error)")
            return false
        }
        for c in configs {
            do throws(SystemError) { try device.setKick(c.index, eventfd: kicks[c.index].raw) } catch {
                logger.error("VDUSE \(name): DRIVER_OK: \(error)")
                return false
            }
            do { try nic.startRing(c) } catch {
                logger.error("VDUSE \(name): DRIVER_OK: \(error)")
                return false
            }
            rings[c.index] = .running
        }
        logger.info("VDUSE \(name): DRIVER_OK: features \(describeFeatures(features)); rings \(configs.map { "\($0.index) (size \($0.size), base \($0.base))" }.joined(separator: ", "))")
        return true
    }

    /// GET_VQ_STATE: the next avail index of ring `index`, stopping it if it runs; nil when it cannot be had.
    func queueState(_ index: Int) -> UInt16? {
        guard index >= 0, index < queueCount else {
            logger.warning("VDUSE \(name): GET_VQ_STATE for ring \(index) of \(queueCount)")
            return nil
        }
        switch rings[index] {
        case .running:
            do {
                let at = try nic.stopRing(index)
                rings[index] = .stopped(at: at)
                return at
            } catch {
                logger.error("VDUSE \(name): GET_VQ_STATE: \(error)")
                return nil
            }
        case .stopped(let at):
            return at
        case .idle, .refused:
            // Never served since the driver set it up: where the driver said it starts.
            do { return try device.queueInfo(index).availIndex } catch {
                logger.error("VDUSE \(name): GET_VQ_STATE: \(error)")
                return nil
            }
        }
    }

    func updateIOTLB(first: UInt64, last: UInt64) -> Bool {
        guard first <= last else { return false }
        guard iotlb.update(first: first, last: last) else { return true }
        do { try nic.setMemory(iotlb.snapshot()) } catch {
            logger.error("VDUSE \(name): UPDATE_IOTLB: \(error)")
            return false
        }
        return true
    }

    func reset() {
        nic.reset()
        iotlb.removeAll()
        for i in rings.indices { rings[i] = .idle }
        status = 0
        currentStatus.store(0, ordering: .relaxed)
    }

    func stopRunningRings() {
        for i in rings.indices where rings[i] == .running {
            do { rings[i] = .stopped(at: try nic.stopRing(i)) } catch {
                logger.error("VDUSE \(name): \(error)")
            }
        }
    }

    func dropFaultedWindows() {
        let dropped = iotlb.dropFaulted()
        guard !dropped.isEmpty else { return }
        logger.error("VDUSE \(name): the device touched memory its driver does not back (SIGBUS absorbed) in \(dropped.map { "[0x\(String($0.lowerBound, radix: 16)), 0x\(String($0.upperBound, radix: 16))]" }.joined(separator: ", ")); those windows are dropped and will be looked up again")
        do { try nic.setMemory(iotlb.snapshot()) } catch { logger.error("VDUSE \(name): \(error)") }
    }

    func deviceBroken() {
        broken.store(true, ordering: .relaxed)
        logger.critical("VDUSE \(name): the kernel marked the device broken (a request went unanswered past its msg_timeout); it is served no more")
        reset()
    }
}
