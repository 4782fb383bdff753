#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import DeviceFramework
import Logging
import Platform
import Synchronization
import VhostUser
import Virtio

/// How the relay thread waits for completions.
public enum RelayLoopMode: String, Sendable, CaseIterable {
    /// epoll on the device's interrupt eventfds.
    case event
    /// a dedicated busy-polling thread.
    case poll
    /// polls while there is traffic, sleeps on epoll after an idle threshold.
    case hybrid
}

/// Test-only: a journal of what the relay exposed to the guest (VDPAD_TEST_JOURNAL): a device
/// write of `length` bytes at `gpa`, its bytes' checksum, and whether it was marked (see
/// DeviceFramework's `DeviceWriteJournal`, which the SoftNIC writes in `migration=iommu-dirty`).
public protocol RelayJournal: DeviceWriteJournal {}

/// The relay: copies completions from mediated used rings to the guest's used rings, marking in
/// the dirty log every byte the device wrote and every used-ring word it exposes, before it
/// publishes the used index. One thread serves all relayed rings of a port.
public final class RelayEngine: ConfinedTarget, @unchecked Sendable {
    // @unchecked Sendable: the worker is Sendable; the rest is confined to the relay thread
    // (operations that timed out still run there, if at all).
    public let mode: RelayLoopMode
    let logger: Logger
    private let worker: ConfinedWorker<RelayEngine>
    var wake: SharedFD { worker.wake }
    let epoll: Epoll

    var queues: [Int: RelayQueue] = [:]
    var active: [RelayQueue] = []
    var log: DirtyLog?
    var memory = GuestMemoryTable.empty
    var view = GuestMemoryTable.empty.view
    /// Test-only: skip marking the buffers the device wrote (VDPAD_TEST_SKIP_BUFFER_MARKING).
    var skipBufferMarking = false
    var journal: (any RelayJournal)?

    /// CPU time the relay thread spent in polls that found work, and how many elements they moved.
    public let busyNanos = Atomic<UInt64>(0)
    public let busyElements = Atomic<UInt64>(0)
    public let cpuNanos = Atomic<UInt64>(0)

    public init(mode: RelayLoopMode, name: String, logger: Logger) throws {
        self.mode = mode
        self.logger = logger
        worker = try ConfinedWorker(name: "relay-\(name)")
        epoll = try Epoll(capacity: 64)
        try epoll.add(wake.raw, token: Self.wakeToken)
        try worker.start(self)
    }

    /// Runs `body` on the relay thread between relay steps and returns its value. Throws at once
    /// on a relay that has stopped.
    public func perform<R: Sendable>(_ body: @escaping @Sendable (RelayEngine) -> R) throws(WorkerError) -> R {
        do { return try worker.perform(body) } catch {
            logger.warning("relay: control operation not applied: \(error)")
            throw error
        }
    }

    public func stop() {
        // Bounded: a thread blocked on a frontend's fd is interrupted (ConfinedWorker); one that
        // still does not answer must not hold the port's or the daemon's shutdown: it is
        // abandoned, loudly, and ends with the process.
        if !worker.stop() {
            logger.error("relay thread did not stop within \(2 * worker.timeoutSeconds) s (blocked on a frontend's fd?); abandoning it")
        }
    }

    /// After the relay was interrupted out of a system call (a guest call or device kick eventfd
    /// the frontend made blocking again): it stops signalling every such fd.
    public func quarantineBlockingFDs() {
        for q in queues.values {
            if q.guestCallFD >= 0 && !EventFD.isNonBlocking(q.guestCallFD) {
                q.guestCallFD = -1
                q.config.ring.call = nil
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                logger.error("relay: ring \(q.config.ring.index): the frontend made its call eventfd blocking again; no more interrupts on it")
            }
            if let a = q.avail, let k = a.guestKick, !EventFD.isNonBlocking(k.raw) {
                epoll.remove(k.raw)
                a.guestKick = nil
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                logger.error("relay: ring \(q.config.ring.index): the frontend made its kick eventfd blocking; the avail relay polls the ring every millisecond instead")
                updateSleep()
            }
            if let k = q.config.ring.kick, !EventFD.isNonBlocking(k.raw) {
                q.config.ring.kick = nil
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                logger.error("relay: ring \(q.config.ring.index): the frontend made its kick eventfd blocking again; the relay no longer rings it")
            }
        }
    }

    // MARK: operations (called through perform)

    /// Runs an operation on the relay thread and returns its value; throws if the relay has
    /// stopped or does not answer.
    func apply<R: Sendable>(_ what: String, _ body: @escaping @Sendable (RelayEngine) -> R) throws(SystemError) -> R {
        do { return try perform(body) } catch {
            throw SystemError("relay: \(what) (\(error))", errno: error == .stopped ? ESHUTDOWN : ETIMEDOUT)
        }
    }

    public func setLog(_ newLog: DirtyLog?) throws(SystemError) {
        try apply("set log") { $0.log = newLog }
    }

    /// Both at once: one handoff to the relay thread instead of two (a switchover's reply waits
    /// for each).
    public func setLogAndMemory(_ newLog: DirtyLog?, _ table: GuestMemoryTable) throws(SystemError) {
        try apply("set log and memory table") { e in
            e.log = newLog
            e.memory = table
            e.view = table.view
            for q in e.queues.values { e.translate(q) }
        }
    }

    public func setMemory(_ table: GuestMemoryTable) throws(SystemError) {
        try apply("set memory table") { e in
            e.memory = table
            e.view = table.view
            for q in e.queues.values { e.translate(q) }
        }
    }

    public func setTestSwitches(skipBufferMarking: Bool, journal: (any RelayJournal)?) throws(SystemError) {
        try apply("set test switches") { e in
            e.skipBufferMarking = skipBufferMarking
            e.journal = journal
        }
    }

    /// Starts relaying ring `config.ring.index` from `mediated`, whose next entry is `startIndex`; the
    /// device signals `deviceCall` when it completes into it.
    public func attach(_ config: RelayRingConfig, mediated: MediatedUsedRing, startIndex: UInt16, deviceCall: SharedFD,
                       counters: RelayCounters) throws(SystemError) {
        let failure = try apply("attach ring \(config.ring.index)") { e -> SystemError? in
            do throws(SystemError) { try e.epoll.add(deviceCall.raw, token: UInt64(config.ring.index)) } catch { return error }
            let q = RelayQueue(config: config, mediated: mediated, deviceCall: deviceCall, startIndex: startIndex, counters: counters)
            e.translate(q)
            e.queues[config.ring.index] = q
            e.active = Array(e.queues.values)
            e.updateSleep()
            return nil
        }
        if let failure { throw failure }
    }

    /// As `attach`, for the avail relay (`relay=avail+used`): the device reads `mediatedAvail`,
    /// whose idx it was given at `position.nextAvail`, completes into `mediated` from
    /// `position.usedIndex`, and is kicked on `deviceKick` (its doorbell now); the relay checks
    /// what the guest posts, woken by the guest's kick (`config.ring.kick`).
    public func attach(_ config: RelayRingConfig, mediated: MediatedUsedRing, mediatedAvail: MediatedAvailRing, position: RingPosition,
                       deviceCall: SharedFD, deviceKick: SharedFD, counters: RelayCounters) throws(SystemError) {
        let failure = try apply("attach ring \(config.ring.index)") { e -> SystemError? in
            let guestKick = config.ring.kick
            do throws(SystemError) {
                try e.epoll.add(deviceCall.raw, token: UInt64(config.ring.index))
                if let k = guestKick { try e.epoll.add(k.raw, token: Self.guestKickToken | UInt64(config.ring.index)) }
            } catch {
                e.epoll.remove(deviceCall.raw)
                return error
            }
            let q = RelayQueue(config: config, mediated: mediated, deviceCall: deviceCall, startIndex: position.usedIndex, counters: counters)
            q.avail = AvailRelayState(ring: mediatedAvail, guestKick: guestKick, deviceKick: deviceKick, position: position,
                                      indirect: config.indirect)
            // Ask the device for an interrupt at its next completion (a kernel device follows this;
            // the SoftNIC interrupts every batch anyway).
            q.avail!.writer.storeFlags(0)
            q.avail!.writer.storeUsedEvent(position.usedIndex)
            e.translate(q)
            e.queues[config.ring.index] = q
            e.active = Array(e.queues.values)
            e.updateSleep()
            return nil
        }
        if let failure { throw failure }
    }

    /// Relays whatever the device completed up to now (the device is suspended or stopped by the
    /// caller), marks the whole guest used ring, and stops relaying the ring. For the avail relay
    /// it returns the guest-side position (see `AvailRelayState`): the next guest avail index
    /// (GET_VRING_BASE's answer, or where the device reads on from on the direct path) and the
    /// guest's used index; nil for the used relay (the device's own indices hold).
    @discardableResult
    public func detach(_ index: Int) throws(SystemError) -> RingPosition? {
        try apply("detach ring \(index)") { e -> RingPosition? in
            guard let q = e.queues.removeValue(forKey: index) else { return nil }
            var position: RingPosition?
            if let a = q.avail {
                if let g = q.guest { _ = e.relayCompletions(q, g, a) }
                position = e.guestPosition(q, a)
                if let k = a.guestKick { e.epoll.remove(k.raw) }
            } else {
                _ = e.step(q)
            }
            e.markWholeUsedRing(q.config)
            e.epoll.remove(q.deviceCall.raw)
            e.active = Array(e.queues.values)
            e.updateSleep()
            return position
        }
    }

    /// How long the loop sleeps at most when nothing wakes it: 1 ms while a relayed ring's device
    /// may not interrupt, 100 ms otherwise.
    var sleepMillis: Int32 = 100
    func updateSleep() {
        // An avail-relayed ring without a guest kick (the frontend asked for polling) is polled too.
        sleepMillis = queues.values.contains { $0.config.deviceMayNotInterrupt || ($0.avail != nil && $0.avail?.guestKick == nil) } ? 1 : 100
    }

    public func setGuestCall(_ index: Int, _ call: SharedFD?) throws(SystemError) {
        try apply("set ring \(index)'s guest call") { e in
            guard let q = e.queues[index] else { return }
            q.config.ring.call = call
            q.guestCallFD = call?.raw ?? -1
        }
    }

    public func setUsedLogAddress(_ index: Int, _ gpa: UInt64) throws(SystemError) {
        try apply("set ring \(index)'s used log address") { e in e.queues[index]?.config.ring.usedLogGPA = gpa }
    }

    func markWholeUsedRing(_ c: RelayRingConfig) {
        log?.mark(gpa: c.ring.usedLogGPA, length: UInt64(SplitRingLayout.usedRingBytes(queueSize: c.ring.size)))
    }

    func translate(_ q: RelayQueue) {
        let c = q.config
        do {
            q.guest = try SplitQueue(size: c.ring.size, descriptorTableGPA: c.ring.descGPA, availGPA: c.ring.availGPA, usedGPA: c.ring.usedGPA, memory: view)
        } catch {
            q.guest = nil
            logger.error("relay: ring \(c.ring.index) does not translate through the memory table (\(error)); it is not relayed")
            q.counters.errors.wrappingAdd(1, ordering: .relaxed)
        }
    }
}
