#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Dispatch
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

/// Test-only: a journal of what the relay exposed to the guest (VDPAD_TEST_JOURNAL).
public protocol RelayJournal: AnyObject, Sendable {
    /// A device write of `length` bytes at `gpa`, its bytes' checksum, and whether it was marked.
    func record(ring: Int, gpa: UInt64, length: UInt32, checksum: UInt64, marked: Bool, publishIndex: UInt16)
}

/// The relay: copies completions from mediated used rings to the guest's used rings, marking in
/// the dirty log every byte the device wrote and every used-ring word it exposes, before it
/// publishes the used index. One thread serves all relayed rings of a port.
public final class RelayEngine: ConfinedTarget, @unchecked Sendable {
    // @unchecked Sendable: the worker is Sendable; the rest is confined to the relay thread
    // (operations that timed out still run there, if at all).
    public let mode: RelayLoopMode
    let logger: Logger
    private let worker: ConfinedWorker<RelayEngine>
    private var wake: SharedFD { worker.wake }
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

    static let hybridIdleNanos: UInt64 = 50_000

    public init(mode: RelayLoopMode, name: String, logger: Logger) throws {
        self.mode = mode
        self.logger = logger
        worker = try ConfinedWorker(name: "relay-\(name)")
        epoll = try Epoll(capacity: 64)
        try epoll.add(wake.raw, token: UInt64.max)
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
                q.config.guestCall = nil
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                logger.error("relay: ring \(q.config.index): the frontend made its call eventfd blocking again; no more interrupts on it")
            }
            if let k = q.config.deviceKick, !EventFD.isNonBlocking(k.raw) {
                q.config.deviceKick = nil
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                logger.error("relay: ring \(q.config.index): the frontend made its kick eventfd blocking again; the relay no longer rings it")
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

    /// Starts relaying ring `config.index` from `mediated`, whose next entry is `startIndex`; the
    /// device signals `deviceCall` when it completes into it.
    public func attach(_ config: RelayRingConfig, mediated: MediatedUsedRing, startIndex: UInt16, deviceCall: SharedFD,
                       counters: RelayCounters) throws(SystemError) {
        let failure = try apply("attach ring \(config.index)") { e -> SystemError? in
            do throws(SystemError) { try e.epoll.add(deviceCall.raw, token: UInt64(config.index)) } catch { return error }
            let q = RelayQueue(config: config, mediated: mediated, deviceCall: deviceCall, startIndex: startIndex, counters: counters)
            e.translate(q)
            e.queues[config.index] = q
            e.active = Array(e.queues.values)
            return nil
        }
        if let failure { throw failure }
    }

    /// Relays whatever the device completed up to now (the device is suspended or stopped by the
    /// caller), marks the whole guest used ring, and stops relaying the ring.
    public func detach(_ index: Int) throws(SystemError) {
        try apply("detach ring \(index)") { e in
            guard let q = e.queues.removeValue(forKey: index) else { return }
            _ = e.step(q)
            e.markWholeUsedRing(q.config)
            e.epoll.remove(q.deviceCall.raw)
            e.active = Array(e.queues.values)
        }
    }

    public func setGuestCall(_ index: Int, _ call: SharedFD?) throws(SystemError) {
        try apply("set ring \(index)'s guest call") { e in
            guard let q = e.queues[index] else { return }
            q.config.guestCall = call
            q.guestCallFD = call?.raw ?? -1
        }
    }

    public func setUsedLogAddress(_ index: Int, _ gpa: UInt64) throws(SystemError) {
        try apply("set ring \(index)'s used log address") { e in e.queues[index]?.config.usedLogGPA = gpa }
    }

    /// Marks a whole used ring (flags, entries, idx, avail_event) in the current log.
    public func markUsedRing(logGPA: UInt64, size: UInt16) throws(SystemError) {
        try apply("mark a used ring") { e in
            guard let log = e.log else { return }
            log.mark(gpa: logGPA, length: UInt64(6 + 8 * Int(size)))
        }
    }

    var isRelaying: Bool { !queues.isEmpty }

    func markWholeUsedRing(_ c: RelayRingConfig) {
        log?.mark(gpa: c.usedLogGPA, length: UInt64(6 + 8 * Int(c.size)))
    }

    func translate(_ q: RelayQueue) {
        let c = q.config
        do {
            q.guest = try SplitQueue(size: c.size, descriptorTableGPA: c.descGPA, availGPA: c.availGPA, usedGPA: c.usedGPA, memory: view)
        } catch {
            q.guest = nil
            logger.error("relay: ring \(c.index) does not translate through the memory table (\(error)); it is not relayed")
            q.counters.errors.wrappingAdd(1, ordering: .relaxed)
        }
    }

    // MARK: the relay step

    /// Copies new completions of one ring to the guest. Returns how many it moved.
    @inline(__always)
    func step(_ q: RelayQueue) -> Int {
        guard let g = q.guest else { return 0 }
        let deviceIndex = q.reader.loadIndex()
        let flags = q.reader.loadFlags()
        let availEvent = q.reader.loadAvailEvent()
        let old = q.lastRelayed
        let n = deviceIndex &- old
        let notifyChanged = flags != q.lastFlags || availEvent != q.lastAvailEvent
        if n == 0 && !notifyChanged { return 0 }
        let c = q.config
        guard let log else { return 0 }
        var batch = DirtyLog.Batch(log: log)
        var marks: UInt64 = 0
        var i = old
        while i != deviceIndex {
            let (id, length) = q.reader.element(at: i)
            g.writeUsedElement(at: i, id: id, length: length)
            if c.deviceWritesBuffers && length > 0 && id < UInt32(c.size) {
                marks &+= markWritten(q, head: UInt16(id), length: length, batch: &batch, publishIndex: deviceIndex)
            }
            i &+= 1
        }
        if n > 0 {
            // The used entries [old, deviceIndex): one or two contiguous slot ranges (the ring wraps).
            let first = UInt64(old & (c.size &- 1))
            let count = UInt64(n)
            let tail = min(count, UInt64(c.size) &- first)
            batch.mark(gpa: c.usedLogGPA &+ 4 &+ 8 &* first, length: 8 &* tail)
            if count > tail { batch.mark(gpa: c.usedLogGPA &+ 4, length: 8 &* (count &- tail)) }
        }
        var notificationsEnabled = false
        if notifyChanged {
            // The device's notification state lives in the used ring: carry it to the guest's.
            notificationsEnabled = (flags != q.lastFlags && flags & 1 == 0) || availEvent != q.lastAvailEvent
            g.storeUsedFlags(flags)
            g.storeAvailEvent(availEvent)
            batch.mark(gpa: c.usedLogGPA, length: 2)
            batch.mark(gpa: c.usedLogGPA &+ 4 &+ 8 &* UInt64(c.size), length: 2)
            q.lastFlags = flags
            q.lastAvailEvent = availEvent
        }
        if n > 0 {
            batch.mark(gpa: c.usedLogGPA &+ 2, length: 2)
        }
        // Every mark is in the log before the index that exposes the entries is published:
        // flush does the ORs, and the release store below orders them first.
        batch.flush()
        if n > 0 {
            g.publishUsedIndex(deviceIndex)
            q.lastRelayed = deviceIndex
            if q.guestCallFD >= 0 && g.needsInterrupt(oldUsed: old, newUsed: deviceIndex, eventIdx: c.eventIdx) {
                if !EventFD.signal(q.guestCallFD) { quarantineBlockingFDs() }
                q.counters.interrupts.wrappingAdd(1, ordering: .relaxed)
            }
            q.counters.relayed.wrappingAdd(UInt64(n), ordering: .relaxed)
            q.counters.pagesMarked.wrappingAdd(marks, ordering: .relaxed)
        }
        if notificationsEnabled, let kick = c.deviceKick {
            // The device asked for kicks (it is about to sleep), but the guest sees that request
            // only now, through us: buffers it posted in between came without a kick. Full fence
            // (store of the flags, then load of avail.idx, as virtqueue_enable_cb_delayed), then
            // ring the device's doorbell if the guest has posted buffers the device has not used.
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            if g.loadAvailIndex() != deviceIndex && !EventFD.signal(kick.raw) { quarantineBlockingFDs() }
        }
        return Int(n)
    }

    /// Marks the first `length` bytes of the chain's writable buffers, walking indirect tables.
    /// Buffer addresses are marked as guest-physical addresses, never translated: only the
    /// descriptor table (translated at attach) and an indirect table are read. The walk is bounded
    /// as the device's walker (DescriptorChainWalker): head and next indices inside their table,
    /// at most queue-size buffers per chain, one level of indirection, an indirect descriptor never
    /// with NEXT and its length a non-zero multiple of 16. (Indirect tables are followed whether or
    /// not INDIRECT_DESC is negotiated now: the device decided when the ring started, and marking a
    /// chain it completed is never wrong.)
    /// A chain the guest broke since the device completed it stops the walk and is counted.
    /// Returns the number of pages marked.
    @inline(__always)
    func markWritten(_ q: RelayQueue, head: UInt16, length: UInt32, batch: inout DirtyLog.Batch, publishIndex: UInt16) -> UInt64 {
        guard let g = q.guest else { return 0 }
        var table = UnsafeRawPointer(g.descriptorTable)
        let queueSize = UInt32(q.config.size)
        var tableSize = queueSize
        var index = UInt32(head)
        var ttl = tableSize
        var buffers: UInt32 = 0
        var indirect = false
        var remaining = UInt64(length)
        var pages: UInt64 = 0
        while remaining > 0 {
            guard index < tableSize, ttl > 0, buffers < queueSize else {
                q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                break
            }
            let d = VirtqDescriptor(copyingFrom: table + 16 * Int(index))
            ttl &-= 1
            if d.flags.contains(.indirect) {
                guard !indirect, !d.flags.contains(.next), d.len >= 16, d.len % 16 == 0,
                      let t = view.hostPointer(gpa: d.addr, length: UInt64(d.len)) else {
                    q.counters.errors.wrappingAdd(1, ordering: .relaxed)
                    break
                }
                indirect = true
                table = UnsafeRawPointer(t)
                tableSize = d.len / 16
                ttl = tableSize
                index = 0
                continue
            }
            buffers &+= 1
            if d.flags.contains(.write) && d.len > 0 {
                let m = min(UInt64(d.len), remaining)
                if !skipBufferMarking {
                    batch.mark(gpa: d.addr, length: m)
                    pages &+= ((d.addr &+ m &- 1) >> 12) &- (d.addr >> 12) &+ 1
                }
                if let j = journal { journalRange(j, q, gpa: d.addr, length: m, publishIndex: publishIndex) }
                remaining &-= m
            }
            guard d.flags.contains(.next) else { break }
            index = UInt32(d.next)
        }
        return pages
    }

    /// Test-only: journals one device-written range with a checksum of its bytes now.
    func journalRange(_ j: any RelayJournal, _ q: RelayQueue, gpa: UInt64, length: UInt64, publishIndex: UInt16) {
        var sum: UInt64 = 0xcbf2_9ce4_8422_2325
        if let p = view.hostPointer(gpa: gpa, length: length) {
            for k in 0..<Int(length) { sum = (sum ^ UInt64(p.load(fromByteOffset: k, as: UInt8.self))) &* 0x100_0000_01b3 }
        }
        j.record(ring: q.config.index, gpa: gpa, length: UInt32(length), checksum: sum, marked: !skipBufferMarking,
                 publishIndex: publishIndex)
    }

    // MARK: loop

    /// The relay thread's loop (`ConfinedTarget`; started by init, not to be called otherwise).
    public func run(on worker: ConfinedWorker<RelayEngine>) {
        if mode == .event {
            // The event loop sleeps between batches; real-time priority lets it run as soon as the
            // device's interrupt wakes it, even while busy-polling threads hold every core (the
            // switchover gap is mostly that wake-up). It blocks after every step, so it cannot
            // starve them. Without the privilege it runs at normal priority.
            var param = sched_param(sched_priority: 1)
            if pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) != 0 {
                logger.debug("relay: SCHED_FIFO not permitted; the event loop runs at normal priority")
            }
        }
        var idleSince: UInt64 = 0
        var idle = false
        while !worker.stopRequested {
            if worker.hasPending { worker.runPending(self); continue }
            let t0 = cvdpa_thread_cpu_ns()
            var moved = 0
            for q in active { moved &+= step(q) }
            if moved > 0 {
                let t1 = cvdpa_thread_cpu_ns()
                busyNanos.wrappingAdd(t1 &- t0, ordering: .relaxed)
                busyElements.wrappingAdd(UInt64(moved), ordering: .relaxed)
                cpuNanos.store(t1, ordering: .relaxed)
                idle = false
                // The event loop goes back to epoll after every step: the device's eventfd keeps
                // count, so a batch completed meanwhile wakes it at once.
                if mode == .event { sleepOnEvents() }
                continue
            }
            if active.isEmpty {
                // Nothing attached (no migration running): sleep whatever the loop mode.
                sleepOnEvents()
                continue
            }
            switch mode {
            case .poll:
                cpuNanos.store(t0, ordering: .relaxed)
                continue
            case .hybrid:
                let now = cvdpa_monotonic_ns()
                if !idle { idle = true; idleSince = now; continue }
                if now &- idleSince < Self.hybridIdleNanos { continue }
                sleepOnEvents()
                idle = false
            case .event:
                sleepOnEvents()
            }
        }
        cpuNanos.store(cvdpa_thread_cpu_ns(), ordering: .relaxed)
    }

    private func sleepOnEvents() {
        do {
            _ = try epoll.wait(timeoutMillis: 100) { ev in
                if ev.token == UInt64.max {
                    EventFD.drain(wake.raw)
                } else if let q = queues[Int(ev.token)] {
                    EventFD.drain(q.deviceCall.raw)
                }
            }
        } catch {
            // epoll_wait fails only on a bug (EBADF, EINVAL; EINTR is no error there): say so,
            // and do not spin on it.
            logger.error("relay: \(error)")
            usleep(1000)
        }
        cpuNanos.store(cvdpa_thread_cpu_ns(), ordering: .relaxed)
    }
}
