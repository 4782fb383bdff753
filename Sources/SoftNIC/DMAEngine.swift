#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Dispatch
import Logging
import Platform
import Synchronization
import DeviceFramework
import Virtio

/// The SoftNIC's DMA engine: one thread that serves the guest's split rings directly through the
/// IOMMU, like a vDPA NIC's hardware queues. It polls while there is work and sleeps on the
/// doorbells (the guest's kick eventfds) when idle, with notifications re-enabled first.
/// Everything but its `ConfinedWorker` is confined to the engine's thread.
final class DMAEngine: ConfinedTarget, @unchecked Sendable {
    // @unchecked Sendable: the worker is Sendable; every other field is touched only on the
    // engine thread (or before it starts). A control operation that timed out may still run
    // later, but on the engine thread, like any other.
    let logger: Logger
    let link: LinkSpec
    let portID: String
    let rings: [EngineRing]
    private let worker: ConfinedWorker<DMAEngine>
    var wake: SharedFD { worker.wake }

    // Device state (engine thread).
    var iommu = IOMMUTable.empty
    /// Guest buffers translate here (guest memory only, see IOMMUTable).
    var view = IOMMUTable.empty.guestView
    /// Ring areas translate here (guest memory plus the daemon's mediated rings).
    var ringView = IOMMUTable.empty.view
    var eventIdx = false
    var mergeable = false
    var indirect = false
    var headerLength = 12
    var active: [EngineRing] = []
    var activeRX: [EngineRing] = []

    // Link state.
    enum LinkKind { case consume, loopback, tap, wire }
    let linkKind: LinkKind
    let macOwn: UInt64
    let macGuest: UInt64
    var tap: SharedFD?
    var wireIn: FrameRing?
    var wireOut: FrameRing?
    var sourceSequence: UInt64 = 0
    var sourceEpoch: UInt64 = 0
    var sourceStartNs: UInt64 = 0
    var sourceSent: UInt64 = 0
    var sourceNextRing = 0
    var rxRoundRobin = 0

    // Device buffers (preallocated once).
    let frameBuffer: UnsafeMutableRawPointer
    static let frameBufferSize = 65536
    let sourceTemplate: UnsafeMutableRawPointer
    let epoll: Epoll

    static let batch = 64
    /// How long the engine keeps polling after its last work before it sleeps.
    static let pollNanos: UInt64 = 200_000
    static let wakeToken: UInt64 = 0
    static let tapToken: UInt64 = 1
    static let wireToken: UInt64 = 2
    static let kickTokenBase: UInt64 = 16

    init(portID: String, link: LinkSpec, ringCount: Int, macOwn: UInt64, macGuest: UInt64, stats: [QueueCounterSet], logger: Logger) throws {
        self.portID = portID
        self.link = link
        self.logger = logger
        self.macOwn = macOwn
        self.macGuest = macGuest
        switch link {
        case .sink, .source: linkKind = .consume
        case .loopback: linkKind = .loopback
        case .tap: linkKind = .tap
        case .wire: linkKind = .wire
        }
        rings = (0..<ringCount).map { EngineRing(index: $0, stats: stats[$0]) }
        worker = try ConfinedWorker(name: "dma-\(portID)")
        epoll = try Epoll(capacity: 64)
        frameBuffer = .allocate(byteCount: Self.frameBufferSize, alignment: 64)
        sourceTemplate = .allocate(byteCount: LinkSpec.maxFrame, alignment: 64)
        try epoll.add(wake.raw, token: Self.wakeToken)
        switch link {
        case .tap(let name):
            let fd = try Tap.open(name: name ?? "vdpa-\(portID)".prefixString(15))
            tap = fd.fd
            logger.info("tap link on interface \(fd.name)")
            try epoll.add(fd.fd.raw, token: Self.tapToken)
        case .wire(let peer):
            let inbound = try WireHub.shared.inbound(for: portID)
            wireIn = inbound
            wireOut = try WireHub.shared.inbound(for: peer)
            try epoll.add(inbound.wake.raw, token: Self.wireToken)
        case .source(let size, _):
            Frames.writeSource(to: sourceTemplate, size: size, dst: macGuest, src: macOwn, sequence: 0)
        default:
            break
        }
    }

    deinit {
        frameBuffer.deallocate()
        sourceTemplate.deallocate()
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

    // MARK: control operations (engine thread)

    func rebuildActive() {
        active = rings.filter(\.running)
        activeRX = active.filter(\.isRX)
    }

    func fault(_ ring: EngineRing, _ text: String) {
        // Publish what the ring completed before the fault, then never touch its memory again.
        flush(ring)
        ring.queue = nil
        ring.failure = text
        ring.stats.fault(text)
        logger.error("queue \(ring.index) stopped by a device fault: \(text)")
        rebuildActive()
    }

    /// Translates a ring's areas through the current IOMMU; a miss is a device fault.
    func translate(_ ring: EngineRing) {
        guard let c = ring.config else { ring.queue = nil; return }
        do {
            ring.queue = try SplitQueue(size: c.size, descriptorTableGPA: c.descGPA, availGPA: c.availGPA, usedGPA: c.usedGPA, memory: ringView)
        } catch {
            ring.queue = nil
            fault(ring, "ring areas do not translate through the IOMMU: \(error)")
        }
    }

    var memory = DeviceMemory.empty
    var extraMappings: [UInt64: IOVAMapping] = [:]

    func setMemory(_ memory: DeviceMemory) {
        self.memory = memory
        iommu = IOMMUTable(memory: memory, extra: Array(extraMappings.values))
        view = iommu.guestView
        ringView = iommu.view
        for r in rings where r.config != nil {
            // A faulted ring keeps no pointers into memory that is about to be unmapped.
            if r.failure == nil { translate(r) } else { r.queue = nil }
        }
        rebuildActive()
    }

    func startRing(_ c: VDPARingConfig) {
        let r = rings[c.index]
        stopRingLocal(r)
        r.config = c
        r.failure = nil
        r.errorReset()
        r.walker = DescriptorChainWalker(capacity: c.size, indirectAllowed: indirect)
        r.lastAvail = c.base
        r.usedIdx = c.base
        r.publishedUsed = c.base
        r.availCache = c.base
        r.enabled = c.enabled
        r.call = c.call
        r.callFD = c.call?.raw ?? -1
        r.kick = c.kick
        if let k = c.kick {
            // Each SET_VRING_KICK brings its own fd number (SCM_RIGHTS), so two rings given one
            // eventfd are two epoll entries; the session made it non-blocking, so the ring whose
            // read finds the counter already drained by the other gets EAGAIN, not a wedge.
            do throws(SystemError) { try epoll.add(k.raw, token: Self.kickTokenBase + UInt64(c.index)) } catch {
                r.kick = nil
                fault(r, "cannot watch the ring's kick eventfd: \(error)")
                return
            }
        }
        translate(r)
        r.queue?.disableNotifications(eventIdx: eventIdx)
        r.notificationsEnabled = false
        rebuildActive()
    }

    /// Suspends a ring between batches: what it wrote is published, it is served no more, and
    /// its position is kept. Returns its used index.
    func suspend(_ r: EngineRing) -> UInt16 {
        flush(r)
        r.suspended = true
        rebuildActive()
        return r.usedIdx
    }

    /// Points a suspended ring's used ring at `usedGPA` (an IOVA) and its interrupt at `call`.
    func redirect(_ r: EngineRing, usedGPA: UInt64, call: SharedFD?, interruptEveryBatch: Bool) {
        guard r.config != nil else { return }
        r.config!.usedGPA = usedGPA
        r.call = call
        r.callFD = call?.raw ?? -1
        r.interruptEveryBatch = interruptEveryBatch
        translate(r)
        // The new used ring carries the device's index from now on: seed it before resuming.
        r.queue?.publishUsedIndex(r.usedIdx)
        // The device's notification state lives in the used ring: write it into the new one.
        r.queue?.disableNotifications(eventIdx: eventIdx)
        r.notificationsEnabled = false
    }

    func resume(_ r: EngineRing) {
        r.suspended = false
        rebuildActive()
    }

    func stopRingLocal(_ r: EngineRing) {
        flush(r)
        if let k = r.kick { epoll.remove(k.raw) }
        r.kick = nil
        r.call = nil
        r.callFD = -1
        r.config = nil
        r.queue = nil
        r.suspended = false
        r.interruptEveryBatch = false
        rebuildActive()
    }

    // MARK: the loop

    func run(on worker: ConfinedWorker<DMAEngine>) {
        var idle = 0
        var idleSince: UInt64 = 0
        while !worker.stopRequested {
            if worker.hasPending { worker.runPending(self); continue }
            let work = serviceOnce()
            if work > 0 {
                idle = 0
                continue
            }
            // Poll on for a while after the last work, as hardware queues would keep up with a
            // busy driver; only a longer lull re-enables notifications and sleeps on the doorbells.
            if idle == 0 { idleSince = cvdpa_monotonic_ns() }
            idle &+= 1
            if idle & 63 != 0 || cvdpa_monotonic_ns() &- idleSince < Self.pollNanos { continue }
            sleep()
            idle = 0
        }
        for r in rings where r.config != nil { stopRingLocal(r) }
    }

    /// One pass of the loop's work: a batch of every running TX ring, the link's inbound frames,
    /// and RX completions published. Returns the chains and frames moved (0 = nothing to do).
    @inline(__always)
    func serviceOnce() -> Int {
        var work = 0
        // Index loops: generic iteration allocates in unoptimised builds.
        var i = 0
        while i < active.count {
            let r = active[i]
            if !r.isRX { work &+= serviceTX(r) }
            i &+= 1
        }
        work &+= serviceLinkInbound()
        i = 0
        while i < active.count {
            let r = active[i]
            if r.isRX && r.usedIdx != r.publishedUsed { flush(r) }
            i &+= 1
        }
        return work
    }

    /// Re-enables notifications, re-checks for work that raced in, then waits for a doorbell,
    /// a link event, a control operation or the source's next frame.
    private func sleep() {
        var timeout: Int32 = -1
        var raced = false
        var pollsWithoutDoorbell = false
        let wantRXDoorbells = waitsForRXBuffers
        if case .source(_, let rate) = link, rate > 0, hasRunningRX {
            // Sleep until the next frame is due (at least 1 ms; the generator catches up then).
            let now = cvdpa_monotonic_ns()
            let dueAt = sourceStartNs &+ UInt64(Double(sourceSent &+ 1) * 1e9 / Double(rate))
            if sourceStartNs != 0 && dueAt <= now { return }
            timeout = sourceStartNs == 0 ? 1 : Int32(max(1, min(1000, (dueAt &- now) / 1_000_000)))
        }
        // Index loops throughout: generic iteration allocates in unoptimised builds.
        var i = 0
        while i < active.count {
            let r = active[i]
            i &+= 1
            if r.kick == nil { pollsWithoutDoorbell = true }
            guard let q = r.queue else { continue }
            // RX rings only need doorbells when the device waits for buffers.
            if r.isRX && !wantRXDoorbells { continue }
            // A rate-limited source waits for its next frame, not for buffers: buffers being
            // there is its normal state, not a race.
            if r.isRX, case .source(_, let rate) = link, rate > 0 { continue }
            if q.enableNotifications(eventIdx: eventIdx, lastAvailIndex: r.lastAvail) { raced = true }
            r.notificationsEnabled = true
            // While a relay consumes this ring's interrupts, the notification state it just wrote
            // reaches the guest only through the relay: tell it.
            if r.interruptEveryBatch && r.callFD >= 0 && !EventFD.signal(r.callFD) { quarantineBlockingFDs() }
        }
        // A ring the frontend asked us to poll (SET_VRING_KICK without an fd) has no doorbell.
        if pollsWithoutDoorbell { timeout = 1 }
        if !raced {
          do {
            _ = try epoll.wait(timeoutMillis: timeout) { ev in
                if ev.token >= Self.kickTokenBase {
                    let i = Int(ev.token - Self.kickTokenBase)
                    if i < rings.count, let k = rings[i].kick {
                        if EventFD.drain(k.raw) > 0 { rings[i].stats.doorbells.wrappingAdd(1, ordering: .relaxed) }
                    }
                } else if ev.token == Self.wireToken, let w = wireIn {
                    EventFD.drain(w.wake.raw)
                } else if ev.token == Self.wakeToken {
                    EventFD.drain(wake.raw)
                }
            }
          } catch {
            // epoll_wait fails only on a bug (EBADF, EINVAL; EINTR is no error there): say so,
            // and do not spin on it.
            logger.error("DMA engine of \(portID): \(error)")
            usleep(1000)
          }
        }
        i = 0
        while i < active.count {
            let r = active[i]
            i &+= 1
            if r.notificationsEnabled {
                r.queue?.disableNotifications(eventIdx: eventIdx)
                r.notificationsEnabled = false
            }
        }
    }

    var hasRunningRX: Bool {
        var i = 0
        while i < active.count {
            if active[i].isRX { return true }
            i &+= 1
        }
        return false
    }

    var waitsForRXBuffers: Bool {
        switch link {
        case .source: return true
        case .wire: return !(wireIn?.isEmpty ?? true)
        default: return false
        }
    }

    // MARK: TX (guest → link)

    /// Serves up to one batch of TX chains: gathers each frame into the device buffer, hands it to
    /// the link, completes the chain. Returns the number of chains.
    func serviceTX(_ r: EngineRing) -> Int {
        guard let q = r.queue else { return 0 }
        // Ring state in locals for the loop: class property accesses cost exclusivity checks.
        var lastAvail = r.lastAvail
        var usedIdx = r.usedIdx
        let avail = q.loadAvailIndex()
        let pending = avail &- lastAvail
        if pending == 0 { return 0 }
        if pending > q.size {
            fault(r, "avail index jumped from \(lastAvail) to \(avail), more than the ring size \(q.size)")
            return 0
        }
        let n = min(Int(pending), Self.batch)
        let kind = linkKind
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        var runts: UInt64 = 0
        var tooLarge: UInt64 = 0
        var done = 0
        var faultText: String?
        while done < n {
            let head = q.availHead(at: lastAvail)
            let length: Int
            do {
                let chain = try r.walker.walk(head: head, queue: q, memory: view)
                length = gather(chain)
            } catch {
                faultText = "TX chain at avail index \(lastAvail) (head \(head)): \(error)"
                break
            }
            if length < 0 {
                tooLarge &+= 1
            } else if length < 14 {
                runts &+= 1
            } else {
                if kind != .consume { transmit(frameBuffer, length: length, from: r) }
                packets &+= 1
                bytes &+= UInt64(length)
            }
            q.writeUsedElement(at: usedIdx, id: UInt32(head), length: 0)
            usedIdx &+= 1
            lastAvail &+= 1
            done &+= 1
        }
        r.lastAvail = lastAvail
        r.usedIdx = usedIdx
        flush(r)
        r.stats.add(packets: packets, bytes: bytes)
        if runts > 0 { r.stats.drop(.runt, runts) }
        if tooLarge > 0 { r.stats.drop(.frameTooLarge, tooLarge) }
        if kind == .wire, done > 0, let out = wireOut { EventFD.signal(out.wake.raw) }
        // Loopback frames went to the paired RX ring: publish them with this batch.
        if kind == .loopback { flush(rings[r.index - 1]) }
        if let faultText { fault(r, faultText) }
        return done
    }

    /// Copies the chain's readable bytes after the virtio-net header into the device buffer.
    /// Returns the frame length, or -1 when it does not fit.
    @inline(__always)
    func gather(_ chain: DescriptorChain) -> Int {
        var skip = headerLength
        var out = 0
        var k = 0
        while k < chain.count {
            let seg = chain[k]
            k &+= 1
            if seg.isWritable { continue }
            var src = UnsafeRawPointer(seg.host)
            var len = Int(seg.length)
            if skip > 0 {
                let s = min(skip, len)
                skip -= s
                src += s
                len -= s
            }
            if len == 0 { continue }
            if out + len > LinkSpec.maxFrame { return -1 }
            (frameBuffer + out).copyMemory(from: src, byteCount: len)
            out += len
        }
        return out
    }

    func transmit(_ frame: UnsafeMutableRawPointer, length: Int, from r: EngineRing) {
        switch linkKind {
        case .consume:
            break  // sink and source consume TX frames; they are counted by the caller
        case .loopback:
            let rx = rings[r.index - 1]
            if rx.running {
                deliver(UnsafeRawPointer(frame), length: length, to: rx)
            } else {
                rx.stats.drop(.noBuffer)
            }
        case .tap:
            guard let t = tap else { return }
            if write(t.raw, frame, length) != length { r.stats.drop(.linkError) }
        case .wire:
            if !(wireOut?.push(frame, length: length) ?? false) { r.stats.drop(.linkError) }
        }
    }

    // MARK: RX (link → guest)

    /// Writes one frame (virtio-net header + bytes) into the guest's RX buffers, merging buffers
    /// when MRG_RXBUF was negotiated. Used entries are written but published by `flush`.
    /// Returns false (and counts a drop) when the ring has no room; nothing is consumed then.
    @discardableResult
    func deliver(_ frame: UnsafeRawPointer, length: Int, to r: EngineRing, countDrop: Bool = true) -> Bool {
        guard let q = r.queue else { r.stats.drop(.noBuffer); return false }
        let hdr = headerLength
        let needed = hdr + length
        let start = r.lastAvail
        var availCache = r.availCache
        var problem: DropReason?
        var faultText: String?

        // First, make sure the frame fits in the buffers the guest posted, so that no byte is
        // written into a buffer the frame then does not use (while a migration runs, such bytes
        // would be written but never marked). The common case, one chain large enough, walks once.
        var chainsNeeded = 1
        if ensureAvailable(start, q, start, &availCache, &problem, &faultText) {
            do {
                let head = q.availHead(at: start)
                let first = try r.walker.walk(head: head, queue: q, memory: view)
                if first.writableBytes >= UInt64(needed) {
                    // The common case: one chain holds the frame. Write it from this walk.
                    if let done = writeSingle(first, head: head, frame: frame, length: length, into: r, q: q) {
                        r.availCache = availCache
                        return done
                    }
                }
                if first.writableBytes < UInt64(needed) {
                    if !mergeable {
                        problem = .bufferTooSmall
                    } else {
                        var room = first.writableBytes
                        var idx = start &+ 1
                        while room < UInt64(needed) {
                            guard ensureAvailable(idx, q, start, &availCache, &problem, &faultText) else { break }
                            let c = try r.walker.walk(head: q.availHead(at: idx), queue: q, memory: view)
                            if c.writableBytes == 0 { problem = .bufferTooSmall; break }
                            room += c.writableBytes
                            idx &+= 1
                            chainsNeeded += 1
                        }
                    }
                }
            } catch {
                faultText = "RX chain at avail index \(start): \(error)"
            }
        }

        var idx = start
        var used = r.usedIdx
        var written = 0
        var buffers: UInt16 = 0
        var numBuffersAt: UnsafeMutableRawPointer?
        if faultText == nil && problem == nil {
            while buffers < UInt16(chainsNeeded) && written < needed {
                let head = q.availHead(at: idx)
                var chainWritten = 0
                do {
                    let chain = try r.walker.walk(head: head, queue: q, memory: view)
                    var k = 0
                    while k < chain.count {
                        let seg = chain[k]
                        k &+= 1
                        if !seg.isWritable { continue }
                        var dst = seg.host
                        var room = Int(seg.length)
                        if buffers == 0 && chainWritten == 0 {
                            // The header goes whole into the first writable buffer.
                            guard room >= hdr else { break }
                            dst.initializeMemory(as: UInt8.self, repeating: 0, count: hdr)
                            numBuffersAt = dst + 10
                            dst += hdr
                            room -= hdr
                            chainWritten = hdr
                            written = hdr
                        }
                        let n = min(room, needed - written)
                        if n > 0 {
                            dst.copyMemory(from: frame + (written - hdr), byteCount: n)
                            written += n
                            chainWritten += n
                        }
                        if written == needed { break }
                    }
                } catch {
                    faultText = "RX chain at avail index \(idx) (head \(head)): \(error)"
                    break
                }
                if chainWritten == 0 {
                    problem = .bufferTooSmall
                    break
                }
                q.writeUsedElement(at: used, id: UInt32(head), length: UInt32(chainWritten))
                used &+= 1
                idx &+= 1
                buffers &+= 1
            }
            if problem == nil && faultText == nil && written < needed { problem = .bufferTooSmall }
        }
        r.availCache = availCache
        if let faultText {
            fault(r, faultText)
            return false
        }
        if let problem {
            // Nothing is consumed: used entries written past usedIdx are not published.
            if problem != .noBuffer || countDrop { r.stats.drop(problem) }
            return false
        }
        // num_buffers exists in the 12-byte header (VERSION_1 or MRG_RXBUF); it is 1 without MRG_RXBUF.
        if hdr == 12, let p = numBuffersAt { p.storeBytes(of: buffers.littleEndian, as: UInt16.self) }
        r.lastAvail = idx
        r.usedIdx = used
        r.pendingPackets &+= 1
        r.pendingBytes &+= UInt64(length)
        return true
    }

    /// Makes sure avail entry `idx` exists, reloading avail.idx when needed. (A method with inout
    /// parameters rather than a nested function: captured variables would be boxed on the heap in
    /// unoptimised builds.)
    @inline(__always)
    func ensureAvailable(_ idx: UInt16, _ q: SplitQueue, _ start: UInt16, _ availCache: inout UInt16,
                         _ problem: inout DropReason?, _ faultText: inout String?) -> Bool {
        if idx != availCache { return true }
        let a = q.loadAvailIndex()
        if a &- start > q.size {
            faultText = "avail index jumped from \(start) to \(a), more than the ring size \(q.size)"
            return false
        }
        availCache = a
        if idx == a { problem = .noBuffer; return false }
        return true
    }

    /// Writes a frame that fits in one chain (already walked). Returns nil when the chain's first
    /// writable buffer cannot hold the header (the caller then takes the general path).
    @inline(__always)
    func writeSingle(_ chain: DescriptorChain, head: UInt16, frame: UnsafeRawPointer, length: Int, into r: EngineRing,
                     q: SplitQueue) -> Bool? {
        let hdr = headerLength
        var k = chain.firstWritableIndex
        guard k < chain.count, Int(chain[k].length) >= hdr else { return nil }
        let first = chain[k].host
        first.initializeMemory(as: UInt8.self, repeating: 0, count: hdr)
        // num_buffers = 1 (it exists in the 12-byte header).
        if hdr == 12 { first.storeBytes(of: UInt16(1).littleEndian, toByteOffset: 10, as: UInt16.self) }
        var written = 0
        var dst = first + hdr
        var room = Int(chain[k].length) - hdr
        while true {
            let n = min(room, length - written)
            if n > 0 {
                dst.copyMemory(from: frame + written, byteCount: n)
                written += n
            }
            k &+= 1
            if written == length || k >= chain.count { break }
            let seg = chain[k]
            if !seg.isWritable { continue }
            dst = seg.host
            room = Int(seg.length)
        }
        q.writeUsedElement(at: r.usedIdx, id: UInt32(head), length: UInt32(hdr + written))
        r.usedIdx &+= 1
        r.lastAvail &+= 1
        r.pendingPackets &+= 1
        r.pendingBytes &+= UInt64(length)
        return true
    }

    /// Publishes written used entries and raises the interrupt if the driver wants one.
    @inline(__always)
    func flush(_ r: EngineRing) {
        if r.pendingPackets > 0 {
            r.stats.add(packets: r.pendingPackets, bytes: r.pendingBytes)
            r.pendingPackets = 0
            r.pendingBytes = 0
        }
        guard let q = r.queue, r.usedIdx != r.publishedUsed else { return }
        let old = r.publishedUsed
        q.publishUsedIndex(r.usedIdx)
        r.publishedUsed = r.usedIdx
        if r.callFD >= 0 && (r.interruptEveryBatch || q.needsInterrupt(oldUsed: old, newUsed: r.usedIdx, eventIdx: eventIdx)) {
            // Interrupted out of the write: the eventfd was blocking (see quarantineBlockingFDs).
            if !EventFD.signal(r.callFD) { quarantineBlockingFDs() }
            r.stats.interrupts.wrappingAdd(1, ordering: .relaxed)
        }
    }

    /// Pulls frames from the link (source generator, tap, wire) into the RX rings.
    func serviceLinkInbound() -> Int {
        switch link {
        case .source(let size, let rate):
            return serviceSource(size: size, rate: rate)
        case .tap:
            guard let t = tap else { return 0 }
            var n = 0
            while n < Self.batch {
                let got = read(t.raw, frameBuffer, Self.frameBufferSize)
                if got <= 0 { break }
                n += 1
                if got > LinkSpec.maxFrame { rings[0].stats.drop(.frameTooLarge); continue }
                // Like a NIC without RX descriptors: a frame that finds no running RX ring is dropped.
                guard let rx = nextRX() else { rings[0].stats.drop(.noBuffer); continue }
                deliver(UnsafeRawPointer(frameBuffer), length: got, to: rx)
            }
            return n
        case .wire:
            guard let w = wireIn else { return 0 }
            var n = 0
            while n < Self.batch, let (p, len) = w.peek() {
                guard let rx = nextRX() else {
                    w.pop()
                    rings[0].stats.drop(.noBuffer)  // no RX ring running: counted on RX queue 0
                    n += 1
                    continue
                }
                if !deliver(p, length: len, to: rx, countDrop: false) {
                    // No buffer: keep the frame until the guest posts more (the ring holds 4096).
                    break
                }
                w.pop()
                n += 1
            }
            return n
        default:
            return 0
        }
    }

    /// The next running RX ring, round-robin.
    func nextRX() -> EngineRing? {
        let count = rings.count / 2
        for _ in 0..<count {
            let r = rings[2 * (rxRoundRobin % count)]
            rxRoundRobin &+= 1
            if r.running { return r }
        }
        return nil
    }

    func serviceSource(size: Int, rate: UInt64) -> Int {
        var budget = Self.batch
        if rate > 0 {
            let now = cvdpa_monotonic_ns()
            if sourceStartNs == 0 { sourceStartNs = now }
            let due = UInt64(Double(now &- sourceStartNs) * Double(rate) / 1e9)
            if due <= sourceSent { return 0 }
            budget = Int(min(due - sourceSent, UInt64(Self.batch)))
        }
        let count = activeRX.count
        if count == 0 { return 0 }
        if count == 1 {
            // One ring: hold it for the whole batch (no reference counting per frame).
            return source(into: activeRX[0], size: size, rate: rate, budget: budget)
        }
        // Several rings: round-robin per frame.
        var n = 0
        var misses = 0
        while n < budget && misses < count {
            let r = activeRX[sourceNextRing % count]
            sourceNextRing &+= 1
            if source(into: r, size: size, rate: rate, budget: 1) == 0 { misses += 1 } else { misses = 0 }
            n += 1
        }
        return n
    }

    /// Generates up to `budget` frames into one ring. Returns the frames generated (delivered,
    /// or dropped for want of a buffer at a set rate).
    @inline(__always)
    func source(into rx: EngineRing, size: Int, rate: UInt64, budget: Int) -> Int {
        var n = 0
        while n < budget {
            let seq = (sourceEpoch << 48) | (sourceSequence & 0xFFFF_FFFF_FFFF)
            sourceTemplate.storeBytes(of: seq.bigEndian, toByteOffset: 14, as: UInt64.self)
            if deliver(UnsafeRawPointer(sourceTemplate), length: size, to: rx, countDrop: rate > 0) {
                sourceSequence &+= 1
            } else if rate == 0 {
                // As fast as the guest posts buffers: wait for more instead of dropping.
                return n
            } else {
                sourceSequence &+= 1  // the frame existed and was lost: the gap shows it
            }
            sourceSent &+= 1
            n += 1
        }
        return n
    }
}

extension EngineRing {
    func errorReset() { stats.errorText.withLock { $0 = nil } }
}

extension String {
    func prefixString(_ n: Int) -> String { String(prefix(n)) }
}
