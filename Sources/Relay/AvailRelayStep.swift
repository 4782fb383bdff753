import DeviceFramework
import Platform
import Synchronization
import VhostUser
import Virtio

/// The avail relay's step (`relay=avail+used`): the chains the guest posted are checked and the
/// accepted heads copied to the mediated avail ring the device reads; completions (the device's,
/// and rejected chains' with length 0) are copied to the guest's used ring, every byte they expose
/// marked first. See `AvailRelayState` for the index spaces and the rule that keeps
/// GET_VRING_BASE exact.
extension RelayEngine {
    @inline(__always)
    func stepAvail(_ q: RelayQueue, _ g: SplitQueue, _ a: AvailRelayState) -> Int {
        guard log != nil else { return 0 }
        // Completions first: the room they free in the mediated ring is used by this step's
        // check (the event loop sleeps after a step that moved work, and neither the guest, which
        // has kicked already, nor an idle device would wake it). Then again for rejected chains
        // that the check found completable at once (an idle device); that call returns at once
        // when there is nothing.
        var moved = relayCompletions(q, g, a)
        moved &+= checkPosted(q, g, a)
        return moved &+ relayCompletions(q, g, a)
    }

    /// Checks the chains the guest posted since the last step, with the device walker's rules
    /// (indices, loops, indirect tables only where negotiated and never nested, every buffer
    /// inside guest memory, no readable after writable, total length): accepted heads go to the
    /// mediated avail ring (published with release, the device kicked if its used ring asks for
    /// it), rejected ones wait in the FIFO for their completion. Then asks the guest for a kick at
    /// the next position. Returns how many chains it took.
    @inline(__always)
    func checkPosted(_ q: RelayQueue, _ g: SplitQueue, _ a: AvailRelayState) -> Int {
        let size = q.config.ring.size
        var taken = 0
        var rounds = 0
        while true {
            let guestIndex = g.loadAvailIndex()
            let pending = guestIndex &- a.guestAvail
            // More than a ring posted cannot be: nothing is taken until the guest's index is sane.
            if pending > size {
                if !a.insaneAvailSeen { a.insaneAvailSeen = true; q.counters.errors.wrappingAdd(1, ordering: .relaxed) }
                return taken
            }
            a.insaneAvailSeen = false
            let old = a.mediatedAvail
            var pos = a.guestAvail
            var slot = old
            var rejected: UInt64 = 0
            var blocked = false
            while pos != guestIndex {
                // At most a ring of slots outstanding at the device, and of rejected chains waiting
                // (neither can be exceeded by a guest that keeps a ring's worth in flight; a guest
                // that does not waits here for completions).
                if slot &- q.lastRelayed >= size || a.rejectedPending >= size { blocked = true; break }
                let head = g.availHead(at: pos)
                do throws(ChainError) {
                    _ = try a.walker.walk(head: head, table: g.descriptorTable, queueSize: size, memory: view)
                    a.writer.writeHead(head, at: slot)
                    a.slotGuestPos[Int(slot & a.mask)] = pos
                    slot &+= 1
                } catch {
                    let k = Int(a.rejectedEnd & a.mask)
                    a.rejectedHead[k] = head
                    a.rejectedAfter[k] = slot
                    a.rejectedEnd &+= 1
                    rejected &+= 1
                }
                pos &+= 1
                taken &+= 1
            }
            a.guestAvail = pos
            if rejected > 0 { q.counters.rejectedChains.wrappingAdd(rejected, ordering: .relaxed) }
            if slot != old {
                a.writer.publishIndex(slot)
                a.mediatedAvail = slot
                // The device's suppression (flags or avail_event in the mediated used ring): kick
                // its doorbell only if it asks, as a driver does (virtqueue_kick_prepare_split).
                if a.writer.deviceWantsKick(used: q.reader, oldIndex: old, newIndex: slot, eventIdx: q.config.eventIdx),
                   !EventFD.signal(a.deviceKick.raw) {
                    quarantineBlockingFDs()
                }
            }
            // Kicks from the guest: the relay always wants them (it sleeps on them in the event
            // loop): used.flags = 0, avail_event = the next position. Both words are in the
            // guest's used ring, so they are marked.
            guard a.availEventWritten != pos, let log else { return taken }
            if a.availEventWritten == nil {
                g.storeUsedFlags(0)
                log.mark(gpa: q.config.ring.usedLogGPA, length: 2)
            }
            g.storeAvailEvent(pos)
            log.mark(gpa: q.config.ring.usedLogGPA &+ 4 &+ 8 &* UInt64(size), length: 2)
            a.availEventWritten = pos
            // vhost_enable_notify: store, full fence, load avail.idx again: a chain posted in
            // between came without a kick, take it now. Bounded: a guest that keeps posting is
            // taken by the next step.
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            rounds &+= 1
            if blocked || g.loadAvailIndex() == pos { return taken }
            if rounds > 4 {
                // A guest that keeps posting: the rest is the next step's. Chains it posted after
                // the last avail_event came without a kick, so wake the loop for that step rather
                // than let the event loop sleep until its timeout.
                EventFD.signal(wake.raw)
                return taken
            }
        }
    }

    /// Copies the device's new completions to the guest's used ring at the relay's guest used
    /// index, marking the written bytes, then completes (length 0) the rejected chains the rule
    /// allows, marks the used entries and index, and publishes. Returns the entries published.
    @inline(__always)
    func relayCompletions(_ q: RelayQueue, _ g: SplitQueue, _ a: AvailRelayState) -> Int {
        let c = q.config
        let deviceIndex = q.reader.loadIndex()
        let old = q.lastRelayed
        let n = deviceIndex &- old
        let rejectedReady = a.rejectedFirst != a.rejectedEnd
            && Int16(bitPattern: deviceIndex &- a.rejectedAfter[Int(a.rejectedFirst & a.mask)]) >= 0
        if n == 0 && !rejectedReady { return 0 }
        // The device cannot have completed a slot the relay never published.
        if n > a.mediatedAvail &- old {
            if !q.insaneIndexSeen { q.insaneIndexSeen = true; q.counters.errors.wrappingAdd(1, ordering: .relaxed) }
            return 0
        }
        q.insaneIndexSeen = false
        guard let log else { return 0 }
        let oldUsed = a.guestUsed
        var marker = WrittenBytesMarker(batch: DirtyLog.Batch(log: log), granularity: c.log, skipMarking: skipBufferMarking,
                                        journal: journal.map { JournalContext(journal: $0, view: view, ring: c.ring.index, publishIndex: oldUsed &+ n) })
        var gu = oldUsed
        var i = old
        while i != deviceIndex {
            let (id, length) = q.reader.element(at: i)
            g.writeUsedElement(at: gu, id: id, length: length)
            if c.deviceWritesBuffers && length > 0 && id < UInt32(c.ring.size) {
                markWritten(q, g, head: UInt16(id), length: length, marker: &marker)
            }
            gu &+= 1
            i &+= 1
        }
        // Rejected chains whose accepted predecessors the device has all completed (by count).
        while a.rejectedFirst != a.rejectedEnd {
            let k = Int(a.rejectedFirst & a.mask)
            guard Int16(bitPattern: deviceIndex &- a.rejectedAfter[k]) >= 0 else { break }
            g.writeUsedElement(at: gu, id: UInt32(a.rejectedHead[k]), length: 0)
            gu &+= 1
            a.rejectedFirst &+= 1
        }
        let count = gu &- oldUsed
        q.lastRelayed = deviceIndex
        if count > 0 {
            Self.markUsedEntries(&marker.batch, c.ring, from: oldUsed, count: count)
            marker.batch.mark(gpa: c.ring.usedLogGPA &+ 2, length: 2)
        }
        // Every mark is in the log before the index that exposes the entries is published.
        marker.batch.flush()
        if count > 0 {
            g.publishUsedIndex(gu)
            a.guestUsed = gu
            notifyGuest(q, g, oldUsed: oldUsed, newUsed: gu, relayed: n, pages: marker.pages)
        }
        // Interrupts from the device: ask for one at its next completion (used_event; a kernel
        // device follows it, the SoftNIC interrupts every batch while relayed anyway).
        if n > 0 { a.writer.storeUsedEvent(deviceIndex) }
        return Int(count)
    }

    /// The guest-side position of a stopped (or suspended) ring, once its last completions were
    /// relayed: the device has completed every slot it took (M = its used index), so the base is
    /// the guest position of slot M, or the relay's guest avail position if the device took every
    /// accepted slot. The guest's used index equals it (see `AvailRelayState`).
    func guestPosition(_ q: RelayQueue, _ a: AvailRelayState) -> RingPosition {
        let m = q.lastRelayed
        let base = a.mediatedAvail == m ? a.guestAvail : a.slotGuestPos[Int(m & a.mask)]
        if a.guestUsed != base {
            q.counters.errors.wrappingAdd(1, ordering: .relaxed)
            logger.error("relay: ring \(q.config.ring.index): guest used index \(a.guestUsed) differs from the avail base \(base) at detach (the device had not completed every chain it took?)")
        }
        return RingPosition(nextAvail: base, usedIndex: a.guestUsed)
    }
}
