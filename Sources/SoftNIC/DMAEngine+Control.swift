import Platform
import DeviceFramework
import Virtio

/// The DMA engine's control operations (engine thread, through `perform`): memory, ring start,
/// suspend, redirect, resume and stop, faults. Each runs between two batches.
extension DMAEngine {
    func rebuildActive() {
        active = rings.filter(\.running)
        activeRX = active.filter(\.isRX)
    }

    func fault(_ ring: EngineRing, _ text: String) {
        translationGeneration &+= 1
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
        translationGeneration &+= 1
        guard let c = ring.config else { ring.queue = nil; return }
        do {
            ring.queue = try SplitQueue(size: c.size, descriptorTableGPA: c.descGPA, availGPA: c.availGPA, usedGPA: c.usedGPA, memory: ringView)
        } catch {
            ring.queue = nil
            fault(ring, "ring areas do not translate through the IOMMU: \(error)")
        }
    }

    /// A ring's interrupt: its call eventfd, or without one the device's raiser (if it has one).
    func setCall(_ r: EngineRing, _ call: SharedFD?) {
        r.call = call
        r.callFD = call?.raw ?? -1
        r.raises = call == nil && raiser != nil
    }

    /// An access to [iova, iova + length) missed the IOMMU: asks the device's resolver, which may
    /// map the range (see `IOMMUMissResolver`), and takes the memory it returns. True when the
    /// access should be retried: the rings were translated again, so callers re-read `r.queue`
    /// and `view`; a ring whose areas no longer translate has faulted. False: it faults as before.
    func resolveMiss(_ range: IOVARange) -> Bool {
        guard let resolver = missResolver, let memory = resolver.resolve(iova: range.iova, length: range.length) else { return false }
        setMemory(memory)
        return true
    }

    func setMemory(_ memory: DeviceMemory) {
        translationGeneration &+= 1
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
        setCall(r, c.call)
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
        markUsedArea(r)
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
    /// With `avail` (the avail relay), also points its avail ring at `avail.availIOVA` (nil: the
    /// guest's) and its doorbell at `avail.kick`, and takes `avail.position` as its next avail and
    /// used index; without a position, a mediated avail ring's idx is seeded with the ring's next
    /// avail index, so the device reads on from where it was (positions carry over).
    func redirect(_ r: EngineRing, usedGPA: UInt64, call: SharedFD?, interruptEveryBatch: Bool, avail: AvailRedirect? = nil) {
        guard r.config != nil else { return }
        r.config!.usedGPA = usedGPA
        setCall(r, call)
        r.interruptEveryBatch = interruptEveryBatch
        if let a = avail {
            r.config!.availGPA = a.availIOVA ?? r.guestAvailGPA
            if let k = r.kick { epoll.remove(k.raw) }
            r.kick = a.kick
            r.config!.kick = a.kick
            if let k = a.kick {
                do throws(SystemError) { try epoll.add(k.raw, token: Self.kickTokenBase + UInt64(r.index)) } catch {
                    r.kick = nil
                    fault(r, "cannot watch the ring's new doorbell eventfd: \(error)")
                    return
                }
            }
            if let p = a.position {
                r.lastAvail = p.nextAvail
                r.usedIdx = p.usedIndex
                r.publishedUsed = p.usedIndex
            }
            r.availCache = r.lastAvail
        }
        translate(r)
        if let a = avail, a.availIOVA != nil, a.position == nil, let q = r.queue {
            // Seed the mediated avail ring's idx with the next avail index before the ring runs.
            AvailRingWriter(size: q.size, avail: q.avail).publishIndex(r.lastAvail)
        }
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
        translationGeneration &+= 1
        flush(r)
        markUsedArea(r)  // entries written past the published index (a frame that did not fit) included
        if let c = r.config { r.stoppedAt = (c.descGPA, c.availGPA, r.lastAvail) }
        if let k = r.kick { epoll.remove(k.raw) }
        r.kick = nil
        setCall(r, nil)
        r.raises = false
        r.config = nil
        r.queue = nil
        r.suspended = false
        r.interruptEveryBatch = false
        rebuildActive()
    }
}

extension DMAEngine {
    /// Takes the negotiated features: the header's size and the offloads each way; a tap link
    /// is told the header's size and which offloads the guest takes (TUNSETOFFLOAD, through
    /// its TapConfigurator), so the kernel hands over only frames the guest can take and does
    /// the rest itself.
    func applyFeatures(_ f: UInt64) {
        features = f
        eventIdx = f & VirtioFeature.ringEventIdx != 0
        mergeable = f & VirtioNetFeature.mrgRxbuf != 0
        indirect = f & VirtioFeature.ringIndirectDesc != 0
        headerLength = VirtioNetHeader.size(features: f)
        translationGeneration &+= 1
        guard let config = link.tapConfig else { return }
        var offloads: UInt32 = 0
        // TUN takes segmentation offloads only together with checksum offload (as the spec's GUEST_TSO* need GUEST_CSUM).
        if f & VirtioNetFeature.guestCsum != 0 {
            offloads |= TapDevice.offloadCsum
            if f & VirtioNetFeature.guestTSO4 != 0 { offloads |= TapDevice.offloadTSO4 }
            if f & VirtioNetFeature.guestTSO6 != 0 { offloads |= TapDevice.offloadTSO6 }
            if f & VirtioNetFeature.guestECN != 0 && offloads & (TapDevice.offloadTSO4 | TapDevice.offloadTSO6) != 0 { offloads |= TapDevice.offloadTSOECN }
            if f & VirtioNetFeature.guestUFO != 0 { offloads |= TapDevice.offloadUFO }
        }
        // Applied off this thread (TapConfigurator); until then no frame passes the tap. Only
        // a change is applied: QEMU sends SET_FEATURES again to turn dirty logging on and off,
        // and the tap must not pause for that.
        if tapSetting.map({ $0.headerLength != headerLength || $0.offloads != offloads }) ?? true {
            tapWanted = config.request(headerLength: headerLength, offloads: offloads)
            tapSetting = (headerLength, offloads)
        }
    }

    /// Whether the tap has the header size and offloads of the negotiated features (frames
    /// pass between the guest and the tap only then).
    @inline(__always)
    var tapReady: Bool { link.tapConfig.map { $0.isApplied(tapWanted) } ?? true }
}
