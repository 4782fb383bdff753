import Logging
import Platform
import Virtio

/// One frontend connection's protocol state: negotiation, memory, log and rings.
/// Confined to the port's thread; it never touches ring memory itself.
public final class BackendSession {
    public let config: BackendConfig
    public let logger: Logger
    public weak var hooks: (any VhostUserDeviceHooks)?

    public private(set) var owner = false
    public private(set) var ackedFeatures: UInt64 = 0
    public private(set) var featuresSet = false
    public private(set) var ackedProtocolFeatures: UInt64 = 0
    public private(set) var protocolFeaturesSet = false
    public private(set) var status: UInt8 = 0
    public private(set) var mtu: UInt16?
    public internal(set) var vrings: [VringConfig]
    public let memory = GuestMemoryHandle()
    public private(set) var log: DirtyLog?
    public private(set) var logFD: SharedFD?
    public private(set) var backendRequestFD: SharedFD?
    /// Signalled when the frontend shrinks a memory or log file under the daemon's mapping (the
    /// SIGBUS guard absorbed the fault): the port then closes this connection.
    public let faultNotify: SharedFD?

    public init(config: BackendConfig, logger: Logger, faultNotify: SharedFD? = nil) {
        self.config = config
        self.logger = logger
        self.faultNotify = faultNotify
        vrings = Array(repeating: VringConfig(), count: config.ringCount)
    }

    /// SIGBUS faults absorbed in this session's guest memory and log mappings.
    public var memoryFaults: UInt64 {
        memory.current().regions.reduce(0) { $0 &+ $1.faults } &+ (log?.faults ?? 0)
    }

    /// Ring `i` as the device side is given it when it starts.
    func ringSetup(_ i: Int) -> RingSetup {
        let v = vrings[i]
        return RingSetup(index: i, size: UInt16(truncatingIfNeeded: v.size), descGPA: v.descGPA, availGPA: v.availGPA,
                         usedGPA: v.usedGPA, usedLogGPA: v.usedLogGPA, base: UInt16(truncatingIfNeeded: v.base),
                         kick: v.kick, call: v.call, enabled: v.enabled)
    }

    public var logAllEnabled: Bool { featuresSet && ackedFeatures & VirtioFeature.vhostLogAll != 0 }

    private var protocolNegotiated: Bool {
        protocolFeaturesSet || ackedFeatures & VirtioFeature.vhostUserProtocolFeatures != 0
    }

    // MARK: handling

    /// Handles one decoded message. Returns the reply bytes to send, if any.
    /// Throws a `VhostUserError` for a message that breaks the protocol; the caller closes the connection.
    public func handle(_ message: VhostUserMessage, fds: inout ReceivedFDs) throws(VhostUserError) -> [UInt8]? {
        let request = message.request
        try checkFeatureGate(request)
        let outcome = try apply(message, fds: &fds)
        switch outcome {
        case .reply(let payload):
            return VhostUserCodec.encodeReply(request, payload: payload)
        case .done:
            return message.header.needReply ? VhostUserCodec.encodeReply(request, payload: VhostUserCodec.u64Payload(0)) : nil
        case .declined(let why):
            logger.warning("\(request.name) declined: \(why)")
            return message.header.needReply ? VhostUserCodec.encodeReply(request, payload: VhostUserCodec.u64Payload(1)) : nil
        }
    }

    enum Outcome {
        case reply([UInt8])
        case done
        case declined(String)
    }

    /// Layer 4: requests gated on features negotiated so far.
    func checkFeatureGate(_ request: VhostUserRequest) throws(VhostUserError) {
        if let needed = request.requiredProtocolFeature, ackedProtocolFeatures & needed == 0 {
            throw VhostUserError(.features, request.name, field: "protocol features",
                                 "requires \(VhostUserProtocolFeature.describe(needed)), which was not negotiated")
        }
        switch request {
        case .getProtocolFeatures, .setProtocolFeatures:
            guard config.virtioFeatures & VirtioFeature.vhostUserProtocolFeatures != 0 else {
                throw VhostUserError(.features, request.name, field: "features", "PROTOCOL_FEATURES is not offered")
            }
        case .setVringEnable:
            guard protocolNegotiated else {
                throw VhostUserError(.features, request.name, field: "features", "PROTOCOL_FEATURES was not negotiated")
            }
        default:
            break
        }
    }

    func ringIndex(_ request: VhostUserRequest, _ index: UInt32) throws(VhostUserError) -> Int {
        guard Int(index) < vrings.count else {
            throw VhostUserError(.semantics, request.name, field: "index", "ring \(index) out of range (port has \(vrings.count) rings, \(config.queuePairs) queue pairs)")
        }
        return Int(index)
    }

    func apply(_ message: VhostUserMessage, fds: inout ReceivedFDs) throws(VhostUserError) -> Outcome {
        let request = message.request
        let name = request.name
        switch (request, message.payload) {
        case (.getFeatures, _):
            return .reply(VhostUserCodec.u64Payload(config.virtioFeatures))

        case (.setFeatures, .u64(let features)):
            let unknown = features & ~config.virtioFeatures
            guard unknown == 0 else {
                throw VhostUserError(.semantics, name, field: "features", "bits not offered: 0x\(String(unknown, radix: 16)) (\(describeFeatures(unknown)))")
            }
            let wasLogging = logAllEnabled
            ackedFeatures = features
            featuresSet = true
            if !protocolNegotiated {
                // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
                for i in vrings.indices { vrings[i].enabled = true }
            }
            if wasLogging != logAllEnabled { logger.info("dirty logging (LOG_ALL) \(logAllEnabled ? "on" : "off")") }
            try hooks?.featuresChanged(ackedFeatures, ringsEnabled: vrings.map(\.enabled))
            if wasLogging && !logAllEnabled && log != nil {
                // The migration is over (or cancelled): the device is back on the direct path and
                // QEMU has freed its log; keep no mapping of it. A new migration sends SET_LOG_BASE.
                log = nil
                try hooks?.logChanged(nil)
            }
            return .done

        case (.getProtocolFeatures, _):
            return .reply(VhostUserCodec.u64Payload(config.protocolFeatures))

        case (.setProtocolFeatures, .u64(let features)):
            let unknown = features & ~config.protocolFeatures
            guard unknown == 0 else {
                throw VhostUserError(.semantics, name, field: "features", "protocol bits not offered: 0x\(String(unknown, radix: 16))")
            }
            ackedProtocolFeatures = features
            protocolFeaturesSet = true
            return .done

        case (.setOwner, _):
            owner = true
            return .done

        case (.resetOwner, _), (.resetDevice, _):
            resetDeviceState()
            return .done

        case (.getQueueNum, _):
            return .reply(VhostUserCodec.u64Payload(UInt64(config.queuePairs)))

        case (.getMaxMemSlots, _):
            return .reply(VhostUserCodec.u64Payload(UInt64(config.maxMemSlots)))

        case (.setMemTable, .memoryTable(let descs)):
            try validateRegions(descs, against: [], request: name)
            try checkAnnouncedBytes(descs.map(\.size) + [UInt64(log?.byteCount ?? 0)], request: name)
            var regions: [MemoryRegion] = []
            for (i, d) in descs.enumerated() {
                guard let fd = fds.take(i) else {
                    throw VhostUserError(.fds, name, field: "fds", "region \(i) has no fd")
                }
                regions.append(try MemoryRegion(d, fd: fd, faultNotify: faultNotify, request: name))
            }
            try checkMappedBytes(regions, log: log, request: name)
            try installMemory(GuestMemoryTable(regions: regions))
            return .done

        case (.addMemReg, .memoryRegion(let d)):
            let current = memory.current().regions
            if current.contains(where: { $0.description.guestPhysAddr == d.guestPhysAddr && $0.size == d.size && $0.userAddr == d.userAddr }) {
                // QEMU 7.2 sends the same region once per queue pair: an exact duplicate is accepted
                // (its fd is closed: the region is already mapped).
                _ = fds.take(0)
                return .done
            }
            guard current.count < config.maxMemSlots else {
                throw VhostUserError(.semantics, name, field: "regions", "all \(config.maxMemSlots) memory slots in use")
            }
            try validateRegions([d], against: current.map(\.description), request: name)
            try checkAnnouncedBytes(current.map(\.size) + [d.size, UInt64(log?.byteCount ?? 0)], request: name)
            guard let fd = fds.take(0) else { throw VhostUserError(.fds, name, field: "fds", "no fd") }
            let region = try MemoryRegion(d, fd: fd, faultNotify: faultNotify, request: name)
            try checkMappedBytes(current + [region], log: log, request: name)
            try installMemory(GuestMemoryTable(regions: current + [region]))
            return .done

        case (.remMemReg, .memoryRegion(let d)):
            let current = memory.current().regions
            guard let i = current.firstIndex(where: { $0.guestPhysAddr == d.guestPhysAddr && $0.size == d.size && $0.userAddr == d.userAddr }) else {
                return .declined("no region at guest address 0x\(String(d.guestPhysAddr, radix: 16)) of size 0x\(String(d.size, radix: 16))")
            }
            var rest = current
            rest.remove(at: i)
            try installMemory(GuestMemoryTable(regions: rest))
            return .done

        case (.setLogBase, .log(let l)):
            let needed = DirtyLog.bytesNeeded(guestPhysEnd: memory.current().guestPhysEnd)
            guard l.size >= needed else {
                throw VhostUserError(.semantics, name, field: "mmap_size", "log of \(l.size) bytes cannot cover guest RAM (needs \(needed))")
            }
            try checkAnnouncedBytes(memory.current().regions.map(\.size) + [l.size], request: name)
            guard let fd = fds.take(0) else { throw VhostUserError(.fds, name, field: "fds", "no fd") }
            let newLog = try DirtyLog(fd: fd, size: l.size, offset: l.offset, faultNotify: faultNotify)
            try checkMappedBytes(memory.current().regions, log: newLog, request: name)
            log = newLog
            logger.info("dirty log set: \(l.size) bytes at offset \(l.offset)")
            try hooks?.logChanged(newLog)
            // SET_LOG_BASE always has a reply: QEMU waits for it before it frees the old log.
            return .reply(VhostUserCodec.u64Payload(0))

        case (.setLogFD, _):
            guard let fd = fds.take(0) else { throw VhostUserError(.fds, name, field: "fds", "no fd") }
            logFD = SharedFD(fd)
            return .done

        case (.setBackendReqFD, _):
            guard let fd = fds.take(0) else { throw VhostUserError(.fds, name, field: "fds", "no fd") }
            backendRequestFD = SharedFD(fd)
            return .done

        case (.setVringNum, .vringState(let s)):
            let i = try ringIndex(request, s.index)
            guard s.num >= 1, s.num <= 32768, s.num & (s.num - 1) == 0 else {
                throw VhostUserError(.semantics, name, field: "num", "ring size \(s.num) is not a power of two in 1...32768")
            }
            guard !vrings[i].started else {
                throw VhostUserError(.semantics, name, field: "index", "ring \(i) is running; stop it (GET_VRING_BASE) first")
            }
            vrings[i].size = s.num
            if let a = vrings[i].address { try translate(a, ring: i, request: name) }
            return .done

        case (.setVringAddr, .vringAddress(let a)):
            let i = try ringIndex(request, a.index)
            guard a.flags & ~VringAddress.logFlag == 0 else {
                throw VhostUserError(.semantics, name, field: "flags", "unknown flags 0x\(String(a.flags, radix: 16))")
            }
            let wasStarted = vrings[i].started
            if wasStarted {
                // QEMU re-sends the address with the log flag toggled while the ring runs: only the
                // flag and log address may change then.
                guard let old = vrings[i].address, old.descUserAddr == a.descUserAddr,
                      old.usedUserAddr == a.usedUserAddr, old.availUserAddr == a.availUserAddr else {
                    throw VhostUserError(.semantics, name, field: "index", "ring \(i) is running; its addresses cannot move")
                }
            }
            try translate(a, ring: i, request: name)
            vrings[i].address = a
            if !wasStarted && vrings[i].started { try hooks?.vringStarted(ringSetup(i)) }
            if wasStarted { try hooks?.usedLogAddressChanged(i, usedLogGPA: vrings[i].usedLogGPA) }
            return .done

        case (.setVringBase, .vringState(let s)):
            let i = try ringIndex(request, s.index)
            let packed = ackedFeatures & VirtioFeature.ringPacked != 0
            guard packed || s.num <= 0xFFFF else {
                throw VhostUserError(.semantics, name, field: "num", "split-ring base \(s.num) exceeds 16 bits")
            }
            guard !vrings[i].started else {
                throw VhostUserError(.semantics, name, field: "index", "ring \(i) is running; stop it (GET_VRING_BASE) first")
            }
            vrings[i].base = s.num
            return .done

        case (.getVringBase, .vringState(let s)):
            let i = try ringIndex(request, s.index)
            if vrings[i].started, let resume = try hooks?.vringStopping(i) {
                vrings[i].base = resume
            }
            vrings[i].kick = nil
            vrings[i].kickPolling = false
            logger.debug("ring \(i) stopped at \(vrings[i].base)")
            return .reply(VhostUserCodec.vringStatePayload(VringState(index: s.index, num: vrings[i].base)))

        case (.setVringKick, .vringFile(let index, let hasFD)):
            let i = try ringIndex(request, index)
            let wasStarted = vrings[i].started
            if hasFD {
                vrings[i].kick = try takeEventFD(&fds, request: name, ring: i)
                vrings[i].kickPolling = false
            } else {
                vrings[i].kick = nil
                vrings[i].kickPolling = true
            }
            if !wasStarted && vrings[i].started { try hooks?.vringStarted(ringSetup(i)) }
            return .done

        case (.setVringCall, .vringFile(let index, let hasFD)):
            let i = try ringIndex(request, index)
            vrings[i].call = hasFD ? try takeEventFD(&fds, request: name, ring: i) : nil
            if vrings[i].started { try hooks?.vringCallChanged(i, call: vrings[i].call) }
            return .done

        case (.setVringErr, .vringFile(let index, let hasFD)):
            let i = try ringIndex(request, index)
            vrings[i].err = hasFD ? try takeEventFD(&fds, request: name, ring: i) : nil
            return .done

        case (.setVringEnable, .vringState(let s)):
            let i = try ringIndex(request, s.index)
            guard s.num <= 1 else {
                throw VhostUserError(.semantics, name, field: "num", "enable must be 0 or 1, got \(s.num)")
            }
            vrings[i].enabled = s.num == 1
            try hooks?.vringEnableChanged(i, enabled: s.num == 1)
            return .done

        case (.sendRARP, .u64(let v)):
            let mac = (0..<6).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
            guard let hooks else { return .declined("no device serves this port yet, so no RARP can be sent") }
            return hooks.sendRARP(mac: mac) ? .done : .declined("device could not send the RARP")

        case (.netSetMTU, .u64(let v)):
            guard v >= 68, v <= 65535 else { return .declined("MTU \(v) outside 68...65535") }
            mtu = UInt16(v)
            return .done

        case (.setStatus, .u64(let v)):
            guard v <= 0xFF else {
                throw VhostUserError(.semantics, name, field: "status", "0x\(String(v, radix: 16)) does not fit the 8-bit device status")
            }
            status = UInt8(v)
            hooks?.statusChanged(status)
            return .done

        case (.getStatus, _):
            return .reply(VhostUserCodec.u64Payload(UInt64(status)))

        default:
            throw VhostUserError(.body, name, field: "payload", "unexpected payload for this request")
        }
    }

    func resetDeviceState() {
        hooks?.reset()
        vrings = Array(repeating: VringConfig(), count: config.ringCount)
        ackedFeatures = 0
        featuresSet = false
        status = 0
        log = nil
        memory.replace(.empty)
        logger.info("device reset")
    }

    /// Releases everything the connection held (fds, mappings) when it closes.
    public func close() {
        for i in vrings.indices where vrings[i].started {
            do { _ = try hooks?.vringStopping(i) } catch {
                logger.error("closing: ring \(i) did not stop cleanly: \(error)")
            }
        }
        hooks?.reset()
        vrings = Array(repeating: VringConfig(), count: config.ringCount)
        memory.replace(.empty)
        log = nil
        logFD = nil
        backendRequestFD = nil
    }
}
