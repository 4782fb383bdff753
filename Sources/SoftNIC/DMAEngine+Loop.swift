import CVDPAShims
import Platform
import Virtio

/// The DMA engine's loop (engine thread): batches of work while there is any, polling a while
/// after the last, then notifications on and a sleep on the doorbells; control operations between
/// batches; used indices published and interrupts raised once per batch.
extension DMAEngine {
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
    func sleep() {
        var timeout: Int32 = -1
        var raced = false
        var pollsWithoutDoorbell = false
        let wantRXDoorbells = link.waitsForRXBuffers
        let rateLimited = link.generator.rate > 0
        if rateLimited, hasRunningRX {
            // Sleep until the next frame is due (at least 1 ms; the generator catches up then).
            guard let millis = link.generator.millisUntilNextFrame() else { return }
            timeout = millis
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
            if r.isRX && rateLimited { continue }
            if q.enableNotifications(eventIdx: eventIdx, lastAvailIndex: r.lastAvail) { raced = true }
            r.notificationsEnabled = true
            markUsedArea(r)
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
                } else if ev.token == Self.wireToken, let w = link.wireIn {
                    EventFD.drain(w.wake.raw)
                } else if ev.token == Self.wakeToken {
                    EventFD.drain(wake.raw)
                }
            }
          } catch {
            // epoll_wait fails only on a bug (EBADF, EINVAL; EINTR is no error there): say so,
            // and do not spin on it.
            logger.error("DMA engine of \(portID): \(error)")
            CurrentThread.sleep(milliseconds: 1)
          }
        }
        i = 0
        while i < active.count {
            let r = active[i]
            i &+= 1
            if r.notificationsEnabled {
                r.queue?.disableNotifications(eventIdx: eventIdx)
                r.notificationsEnabled = false
                markUsedArea(r)
            }
        }
    }

    /// Raises a ring's interrupt through the device's raiser (VDUSE: an ioctl). A failure is the
    /// raiser's to count: the engine has nothing else to try.
    @inline(never)
    func raise(_ r: EngineRing) {
        _ = raiser?.raise(ring: r.index)
    }

    var hasRunningRX: Bool {
        var i = 0
        while i < active.count {
            if active[i].isRX { return true }
            i &+= 1
        }
        return false
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
        // Test-only: one nil check (and only while dirty tracking is on).
        if journal != nil, dirty != nil, r.isRX { journalRX(r, q, from: old) }
        q.publishUsedIndex(r.usedIdx)
        r.publishedUsed = r.usedIdx
        markUsedArea(r)
        if (r.callFD >= 0 || r.raises) && (r.interruptEveryBatch || q.needsInterrupt(oldUsed: old, newUsed: r.usedIdx, eventIdx: eventIdx)) {
            if r.raises {
                raise(r)
            } else if !EventFD.signal(r.callFD) {
                // Interrupted out of the write: the eventfd was blocking (see quarantineBlockingFDs).
                quarantineBlockingFDs()
            }
            r.stats.interrupts.wrappingAdd(1, ordering: .relaxed)
        }
    }
}
