import Logging
import Platform
import Virtio

/// What a port offers to its frontend.
public struct BackendConfig: Sendable {
    public var queuePairs: Int
    public var virtioFeatures: UInt64
    public var protocolFeatures: UInt64
    public var maxMemSlots: Int
    /// Most bytes of the frontend's files (guest memory plus dirty log) one session may map.
    public var maxMappedBytes: UInt64

    /// The virtio-net feature set of the SoftNIC device (the control queue, MAC and link status
    /// stay with the frontend: QEMU keeps the control queue for vhost-user).
    public static let netDeviceFeatures: UInt64 =
        VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.mq | VirtioNetFeature.mtu
        | VirtioFeature.ringEventIdx | VirtioFeature.ringIndirectDesc | VirtioNetFeature.guestAnnounce
        | VirtioFeature.vhostLogAll | VirtioFeature.vhostUserProtocolFeatures

    public static let offeredProtocolFeatures: UInt64 =
        VhostUserProtocolFeature.mq | VhostUserProtocolFeature.logShmfd | VhostUserProtocolFeature.rarp
        | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.netMTU | VhostUserProtocolFeature.backendReq
        | VhostUserProtocolFeature.configureMemSlots | VhostUserProtocolFeature.resetDevice
        | VhostUserProtocolFeature.status

    public init(queuePairs: Int = 1, virtioFeatures: UInt64 = BackendConfig.netDeviceFeatures,
                protocolFeatures: UInt64 = BackendConfig.offeredProtocolFeatures, maxMemSlots: Int = 32,
                maxMappedBytes: UInt64 = BackendConfig.defaultMaxMappedBytes) {
        self.maxMappedBytes = maxMappedBytes
        self.queuePairs = queuePairs
        self.virtioFeatures = virtioFeatures
        self.protocolFeatures = protocolFeatures
        self.maxMemSlots = maxMemSlots
    }

    public var ringCount: Int { queuePairs * 2 }

    /// 1 TiB: more guest RAM than one vhost-user port serves in practice, far less than the
    /// daemon's address space (so a few hostile frontends cannot exhaust it).
    public static let defaultMaxMappedBytes: UInt64 = 1 << 40
}

/// The per-ring state a frontend configures.
public struct VringConfig: Sendable {
    public var size: UInt32 = 0
    public var address: VringAddress?
    /// Guest-physical addresses of the three areas, translated from the frontend's addresses.
    public var descGPA: UInt64 = 0
    public var availGPA: UInt64 = 0
    public var usedGPA: UInt64 = 0
    /// For split rings: the next avail index the device will read.
    public var base: UInt32 = 0
    public var kick: SharedFD?
    /// SET_VRING_KICK with the no-fd bit: the frontend asks the backend to poll.
    public var kickPolling = false
    public var call: SharedFD?
    public var err: SharedFD?
    public var enabled = false

    /// A ring runs once it has a size, addresses and a kick (or polling); GET_VRING_BASE stops it.
    public var started: Bool { size != 0 && address != nil && (kick != nil || kickPolling) }
    public var logging: Bool { (address?.flags ?? 0) & VringAddress.logFlag != 0 }
}

/// Device-side hooks a port installs on a session. Every hook runs on the port's thread while the
/// message that caused it is being handled, so a hook finishes before that message is answered.
/// A hook that throws fails the message: the session closes the connection (the frontend must
/// never be told that a change it asked for, such as logging, is in place when it is not).
public protocol VhostUserDeviceHooks: AnyObject {
    /// The memory table changed (new table already installed in `session.memory`).
    func memoryTableChanged(_ session: BackendSession) throws(VhostUserError)
    /// Ring `index` started (all of size, addresses and kick are set).
    func vringStarted(_ session: BackendSession, index: Int) throws(VhostUserError)
    /// Ring `index` must stop now; return the index the device will resume from (split: last avail idx).
    func vringStopping(_ session: BackendSession, index: Int) throws(VhostUserError) -> UInt32?
    func vringEnableChanged(_ session: BackendSession, index: Int, enabled: Bool) throws(VhostUserError)
    /// The call eventfd of a running ring changed.
    func vringCallChanged(_ session: BackendSession, index: Int) throws(VhostUserError)
    func featuresChanged(_ session: BackendSession) throws(VhostUserError)
    func logChanged(_ session: BackendSession) throws(VhostUserError)
    /// SEND_RARP for `mac`; false if the device cannot send it.
    func sendRARP(_ session: BackendSession, mac: [UInt8]) -> Bool
    func statusChanged(_ session: BackendSession)
    func reset(_ session: BackendSession)
}

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
    public private(set) var vrings: [VringConfig]
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
            try hooks?.featuresChanged(self)
            if wasLogging && !logAllEnabled && log != nil {
                // The migration is over (or cancelled): the device is back on the direct path and
                // QEMU has freed its log; keep no mapping of it. A new migration sends SET_LOG_BASE.
                log = nil
                try hooks?.logChanged(self)
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
            try hooks?.logChanged(self)
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
            if !wasStarted && vrings[i].started { try hooks?.vringStarted(self, index: i) }
            if wasStarted { try hooks?.logChanged(self) }
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
            if vrings[i].started, let resume = try hooks?.vringStopping(self, index: i) {
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
            if !wasStarted && vrings[i].started { try hooks?.vringStarted(self, index: i) }
            return .done

        case (.setVringCall, .vringFile(let index, let hasFD)):
            let i = try ringIndex(request, index)
            vrings[i].call = hasFD ? try takeEventFD(&fds, request: name, ring: i) : nil
            if vrings[i].started { try hooks?.vringCallChanged(self, index: i) }
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
            try hooks?.vringEnableChanged(self, index: i, enabled: s.num == 1)
            return .done

        case (.sendRARP, .u64(let v)):
            let mac = (0..<6).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
            guard let hooks else { return .declined("no device serves this port yet, so no RARP can be sent") }
            return hooks.sendRARP(self, mac: mac) ? .done : .declined("device could not send the RARP")

        case (.netSetMTU, .u64(let v)):
            guard v >= 68, v <= 65535 else { return .declined("MTU \(v) outside 68...65535") }
            mtu = UInt16(v)
            return .done

        case (.setStatus, .u64(let v)):
            guard v <= 0xFF else {
                throw VhostUserError(.semantics, name, field: "status", "0x\(String(v, radix: 16)) does not fit the 8-bit device status")
            }
            status = UInt8(v)
            hooks?.statusChanged(self)
            return .done

        case (.getStatus, _):
            return .reply(VhostUserCodec.u64Payload(UInt64(status)))

        default:
            throw VhostUserError(.body, name, field: "payload", "unexpected payload for this request")
        }
    }

    // MARK: helpers

    /// Checks new regions: non-empty, no address overflow, page-aligned, and no overlap with each
    /// other or with `existing` (in guest-physical or frontend-virtual space).
    func validateRegions(_ new: [MemoryRegionDescription], against existing: [MemoryRegionDescription], request: String) throws(VhostUserError) {
        var all = existing
        for (i, d) in new.enumerated() {
            let field = new.count > 1 ? "regions[\(i)]" : "region"
            guard d.size > 0 else { throw VhostUserError(.semantics, request, field: "\(field).memory_size", "zero") }
            guard !d.guestPhysAddr.addingReportingOverflow(d.size).overflow else {
                throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr", "0x\(String(d.guestPhysAddr, radix: 16)) + size overflows")
            }
            guard d.guestPhysAddr + d.size <= reservedIOVABase else {
                throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr",
                                     "[0x\(String(d.guestPhysAddr, radix: 16)), +0x\(String(d.size, radix: 16))) reaches the daemon's reserved IOVA range at 0x\(String(reservedIOVABase, radix: 16))")
            }
            guard !d.userAddr.addingReportingOverflow(d.size).overflow else {
                throw VhostUserError(.semantics, request, field: "\(field).userspace_addr", "0x\(String(d.userAddr, radix: 16)) + size overflows")
            }
            for o in all {
                if d.guestPhysAddr < o.guestPhysAddr + o.size && o.guestPhysAddr < d.guestPhysAddr + d.size {
                    throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr",
                                         "[0x\(String(d.guestPhysAddr, radix: 16)), +0x\(String(d.size, radix: 16))) overlaps the region at 0x\(String(o.guestPhysAddr, radix: 16))")
                }
                if d.userAddr < o.userAddr + o.size && o.userAddr < d.userAddr + d.size {
                    throw VhostUserError(.semantics, request, field: "\(field).userspace_addr",
                                         "0x\(String(d.userAddr, radix: 16)) overlaps another region's addresses")
                }
            }
            all.append(d)
        }
    }

    /// Translates and checks one ring's addresses against the current memory table.
    func translate(_ a: VringAddress, ring i: Int, request: String) throws(VhostUserError) {
        let table = memory.current()
        guard !table.regions.isEmpty else {
            throw VhostUserError(.semantics, request, field: "desc_user_addr", "no memory table yet")
        }
        let n = UInt64(max(vrings[i].size, 1))
        let eventIdx: UInt64 = 2
        let areas: [(String, UInt64, UInt64, UInt64)] = [
            ("desc_user_addr", a.descUserAddr, 16 * n, 16),
            ("avail_user_addr", a.availUserAddr, 4 + 2 * n + eventIdx, 2),
            ("used_user_addr", a.usedUserAddr, 4 + 8 * n + eventIdx, 4),
        ]
        var gpas: [UInt64] = []
        for (field, addr, len, align) in areas {
            guard addr % align == 0 else {
                throw VhostUserError(.semantics, request, field: field, "0x\(String(addr, radix: 16)) is not \(align)-byte aligned")
            }
            guard let gpa = table.guestPhysAddr(userAddr: addr, length: len) else {
                throw VhostUserError(.semantics, request, field: field, "[0x\(String(addr, radix: 16)), +\(len)) is not inside guest memory")
            }
            gpas.append(gpa)
        }
        if a.flags & VringAddress.logFlag != 0 {
            guard table.hostPointer(gpa: a.logGuestAddr, length: 4 + 8 * n + eventIdx) != nil else {
                throw VhostUserError(.semantics, request, field: "log_guest_addr", "0x\(String(a.logGuestAddr, radix: 16)) is not inside guest memory")
            }
        }
        vrings[i].descGPA = gpas[0]
        vrings[i].availGPA = gpas[1]
        vrings[i].usedGPA = gpas[2]
    }

    /// Takes the eventfd of a SET_VRING_KICK/CALL/ERR: it must be an eventfd, and is made
    /// non-blocking so that no daemon thread can block on it.
    func takeEventFD(_ fds: inout ReceivedFDs, request: String, ring i: Int) throws(VhostUserError) -> SharedFD {
        guard let fd = fds.take(0) else { throw VhostUserError(.fds, request, field: "fds", "no fd") }
        do { try EventFD.adoptFrontendFD(fd) } catch {
            throw VhostUserError(.fds, request, field: "fd", "ring \(i): \(error)")
        }
        return SharedFD(fd)
    }

    func withinCap(_ bytes: UInt64) -> Bool { bytes <= config.maxMappedBytes }

    /// The per-session cap, from the sizes the frontend announced, before anything is mapped (a
    /// huge sparse file must not take the daemon's address space even for a moment).
    func checkAnnouncedBytes(_ sizes: [UInt64], request: String) throws(VhostUserError) {
        var total: UInt64 = 0
        for size in sizes {
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow, withinCap(sum) else {
                throw VhostUserError(.semantics, request, field: "memory_size",
                                     "the session would map more than the limit of \(config.maxMappedBytes) bytes of the frontend's files")
            }
            total = sum
        }
    }

    /// The per-session cap on mapped bytes (guest memory plus log), exact after mapping (each
    /// window rounded out to whole pages).
    func checkMappedBytes(_ regions: [MemoryRegion], log: DirtyLog?, request: String) throws(VhostUserError) {
        let total = regions.reduce(UInt64(0)) { $0 + UInt64($1.mappedBytes) } + UInt64(log?.mappedBytes ?? 0)
        guard withinCap(total) else {
            throw VhostUserError(.semantics, request, field: "memory_size",
                                 "the session would map \(total) bytes of the frontend's files, more than the limit of \(config.maxMappedBytes)")
        }
    }

    func installMemory(_ table: GuestMemoryTable) throws(VhostUserError) {
        memory.replace(table)
        logger.info("memory table: \(table.regions.count) region(s), guest RAM ends at 0x\(String(table.guestPhysEnd, radix: 16))")
        for i in vrings.indices {
            guard let a = vrings[i].address else { continue }
            do { try translate(a, ring: i, request: "memory table") } catch {
                logger.warning("ring \(i): addresses no longer translate after the memory table changed: \(error)")
            }
        }
        try hooks?.memoryTableChanged(self)
    }

    func resetDeviceState() {
        hooks?.reset(self)
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
            do { _ = try hooks?.vringStopping(self, index: i) } catch {
                logger.error("closing: ring \(i) did not stop cleanly: \(error)")
            }
        }
        hooks?.reset(self)
        vrings = Array(repeating: VringConfig(), count: config.ringCount)
        memory.replace(.empty)
        log = nil
        logFD = nil
        backendRequestFD = nil
    }
}
