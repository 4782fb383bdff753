import Platform
import Virtio
import VhostUser

/// The kick and call eventfds the frontend made for one ring (it keeps them; the backend gets copies).
public final class VringNotifiers: Sendable {
    // Sendable: both fds are immutable owned descriptors; eventfd reads and writes are thread-safe.
    public let kick: FileDescriptor
    public let call: FileDescriptor

    public init() throws(FrontendError) {
        do {
            // Non-blocking, as QEMU's event_notifier_init makes them (the flag is shared with the backend's copy).
            kick = try EventFD.make(nonBlocking: true)
            call = try EventFD.make(nonBlocking: true)
        } catch { throw .system(error) }
    }
}

/// A ring as the frontend set it up.
public struct ConfiguredRing: Sendable {
    public var addresses: PlacedRing
    public var base: UInt16
    public let notifiers: VringNotifiers
    public var kickFD: Int32 { notifiers.kick.raw }
    public var callFD: Int32 { notifiers.call.raw }
}

/// What `negotiate` found and agreed.
public struct Negotiation: Equatable, Sendable {
    public var offeredFeatures: UInt64
    public var ackedFeatures: UInt64
    public var offeredProtocolFeatures: UInt64
    public var ackedProtocolFeatures: UInt64
    public var queueCount: UInt64?
}

extension VhostUserFrontend {
    /// VERSION_1 and PROTOCOL_FEATURES: the least a modern frontend asks for.
    public static let defaultFeatures: UInt64 = VirtioFeature.version1 | VirtioFeature.vhostUserProtocolFeatures
    /// The protocol features this frontend can use.
    public static let supportedProtocolFeatures: UInt64 = VhostUserProtocolFeature.mq | VhostUserProtocolFeature.logShmfd
        | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.configureMemSlots | VhostUserProtocolFeature.rarp
        | VhostUserProtocolFeature.netMTU

    var replyAckNegotiated: Bool { ackedProtocolFeatures & VhostUserProtocolFeature.replyAck != 0 }
    /// VHOST_USER_F_PROTOCOL_FEATURES was acknowledged with SET_FEATURES: rings start disabled.
    public var protocolFeaturesNegotiated: Bool { ackedFeatures & VirtioFeature.vhostUserProtocolFeatures != 0 }

    // MARK: feature negotiation

    /// GET_FEATURES, SET_OWNER, then (if the backend offers PROTOCOL_FEATURES and `features` asks
    /// for it) GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (the intersection), GET_QUEUE_NUM (if MQ
    /// was agreed), and finally SET_FEATURES with the intersection of `features` and the offer.
    @discardableResult
    public func negotiate(features: UInt64 = VhostUserFrontend.defaultFeatures,
                          protocolFeatures: UInt64 = VhostUserFrontend.supportedProtocolFeatures) throws(FrontendError) -> Negotiation {
        offeredFeatures = try getU64(.getFeatures)
        try request(.setOwner)
        let acked = offeredFeatures & features
        var protocolAcked: UInt64 = 0
        if acked & VirtioFeature.vhostUserProtocolFeatures != 0 {
            offeredProtocolFeatures = try getU64(.getProtocolFeatures)
            protocolAcked = offeredProtocolFeatures & protocolFeatures
            try request(.setProtocolFeatures, payload: .u64(protocolAcked))
            if protocolAcked & VhostUserProtocolFeature.mq != 0 {
                queueCount = try getU64(.getQueueNum)
            }
        }
        try request(.setFeatures, payload: .u64(acked), needReply: wantsAck(for: .setFeatures))
        return Negotiation(offeredFeatures: offeredFeatures, ackedFeatures: acked, offeredProtocolFeatures: offeredProtocolFeatures,
                           ackedProtocolFeatures: protocolAcked, queueCount: queueCount)
    }

    /// Sends a GET_* request and returns its u64 answer.
    public func getU64(_ req: VhostUserRequest) throws(FrontendError) -> UInt64 {
        guard let reply = try request(req), let v = reply.u64 else {
            throw .malformedReply(request: req.name, reason: "expected an 8-byte u64 payload")
        }
        return v
    }

    /// SET_FEATURES with `features` (LOG_ALL kept as it is now unless given): for re-negotiation tests.
    public func setFeatures(_ features: UInt64) throws(FrontendError) {
        try request(.setFeatures, payload: .u64(features), needReply: wantsAck(for: .setFeatures))
    }

    func wantsAck(for req: VhostUserRequest, logging: Bool = false) -> Bool {
        guard replyAckNegotiated else { return false }
        switch ackPolicy {
        case .never: return false
        case .always: return true
        case .likeQEMU:
            switch req {
            case .setMemTable, .addMemReg, .remMemReg: return true
            case .setFeatures, .setVringAddr: return logging
            default: return false
            }
        }
    }

    /// QEMU's enforce_reply: without REPLY_ACK, a GET_FEATURES round trip proves the backend has
    /// processed everything sent before it.
    func barrierIfNoAck(_ wanted: Bool) throws(FrontendError) {
        if wanted && !replyAckNegotiated && ackPolicy != .never { try barrier() }
    }

    // MARK: memory

    /// SET_MEM_TABLE with every region of `ram`, sending their memfds.
    public func setMemTable(_ ram: [GuestRAM]) throws(FrontendError) {
        guard !ram.isEmpty, ram.count <= VhostUserCodec.maxMemTableRegions else {
            throw .invalidArgument("\(ram.count) regions; SET_MEM_TABLE carries 1...\(VhostUserCodec.maxMemTableRegions)")
        }
        try request(.setMemTable, payload: .memoryTable(ram.map(\.regionDescription)), fds: ram.map(\.fd),
                    needReply: wantsAck(for: .setMemTable))
        memoryTable = ram
    }

    /// GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS).
    public func getMaxMemSlots() throws(FrontendError) -> UInt64 {
        try requireProtocol(VhostUserProtocolFeature.configureMemSlots, "GET_MAX_MEM_SLOTS", "CONFIGURE_MEM_SLOTS")
        return try getU64(.getMaxMemSlots)
    }

    func requireProtocol(_ bit: UInt64, _ step: String, _ name: String) throws(FrontendError) {
        guard ackedProtocolFeatures & bit != 0 else { throw .notNegotiated(step: step, feature: name) }
    }

    // MARK: rings

    /// QEMU's order for starting a ring: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (user
    /// addresses from the memory table; the log flag too if logging is on), SET_VRING_KICK and
    /// SET_VRING_CALL with new eventfds that the frontend keeps, then SET_VRING_ENABLE 1 when
    /// PROTOCOL_FEATURES was negotiated. Write the used ring's idx (= `base` for a fresh start)
    /// before calling: backends read it from guest memory.
    @discardableResult
    public func setupVring(index: UInt32, size: UInt32, descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64,
                           base: UInt16 = 0) throws(FrontendError) -> ConfiguredRing {
        try setupVring(PlacedRing(index: index, size: size, descGPA: descGPA, availGPA: availGPA, usedGPA: usedGPA), base: base)
    }

    @discardableResult
    /// Sets ring `ring` up (NUM, BASE, ADDR, KICK, CALL) and, with protocol features, enables it
    /// unless `enable` is false (QEMU enables rings only after SET_LOG_BASE when it starts a
    /// device during a migration).
    public func setupVring(_ ring: PlacedRing, base: UInt16 = 0, enable: Bool = true) throws(FrontendError) -> ConfiguredRing {
        let address = try vringAddress(ring, logging: logAllSet)
        let notifiers = try VringNotifiers()
        let i = ring.index
        try request(.setVringNum, payload: .vringState(VringState(index: i, num: ring.size)), needReply: wantsAck(for: .setVringNum))
        try request(.setVringBase, payload: .vringState(VringState(index: i, num: UInt32(base))), needReply: wantsAck(for: .setVringBase))
        try sendVringAddress(address)
        try request(.setVringKick, payload: .vringFile(index: i, hasFD: true), fds: [notifiers.kick.raw], needReply: wantsAck(for: .setVringKick))
        try request(.setVringCall, payload: .vringFile(index: i, hasFD: true), fds: [notifiers.call.raw], needReply: wantsAck(for: .setVringCall))
        let configured = ConfiguredRing(addresses: ring, base: base, notifiers: notifiers)
        rings[i] = configured
        if protocolFeaturesNegotiated && enable { try setVringEnable(index: i, true) }
        return configured
    }

    /// SET_VRING_ENABLE.
    public func setVringEnable(index: UInt32, _ enabled: Bool) throws(FrontendError) {
        try request(.setVringEnable, payload: .vringState(VringState(index: index, num: enabled ? 1 : 0)),
                    needReply: wantsAck(for: .setVringEnable))
    }

    /// GET_VRING_BASE: stops the ring and returns the next available index the backend would process.
    public func getVringBase(index: UInt32) throws(FrontendError) -> UInt32 {
        guard let reply = try request(.getVringBase, payload: .vringState(VringState(index: index, num: 0))),
              let state = reply.vringState else {
            throw .malformedReply(request: "GET_VRING_BASE", reason: "expected an 8-byte vring state")
        }
        guard state.index == index else {
            throw .malformedReply(request: "GET_VRING_BASE", reason: "answer is for ring \(state.index), asked for \(index)")
        }
        return state.num
    }

    /// The kick eventfd of a set-up ring (write to it to kick).
    public func kickFD(ring: UInt32) -> Int32? { rings[ring]?.kickFD }
    /// The call eventfd of a set-up ring (readable when the backend signalled).
    public func callFD(ring: UInt32) -> Int32? { rings[ring]?.callFD }

    /// Kicks a ring through its eventfd.
    public func kick(ring: UInt32) {
        if let fd = rings[ring]?.kickFD { EventFD.signal(fd) }
    }

    /// Waits until the backend signals the ring's call eventfd; returns the count drained (0 on timeout).
    public func waitForCall(ring: UInt32, timeout: Duration) throws(FrontendError) -> UInt64 {
        guard let fd = rings[ring]?.callFD else { throw .invalidArgument("ring \(ring) was not set up") }
        guard try Self.waitReadable(fd, timeout: timeout) else { return 0 }
        return EventFD.drain(fd)
    }

    func vringAddress(_ ring: PlacedRing, logging: Bool) throws(FrontendError) -> VringAddress {
        let desc = try memoryTable.userAddress(ofGPA: ring.descGPA, length: RingPlacement.descTableBytes(size: ring.size))
        let avail = try memoryTable.userAddress(ofGPA: ring.availGPA, length: RingPlacement.availRingBytes(size: ring.size))
        let used = try memoryTable.userAddress(ofGPA: ring.usedGPA, length: RingPlacement.usedRingBytes(size: ring.size))
        return VringAddress(index: ring.index, flags: logging ? VringAddress.logFlag : 0, descUserAddr: desc,
                            usedUserAddr: used, availUserAddr: avail, logGuestAddr: ring.usedGPA)
    }

    func sendVringAddress(_ address: VringAddress) throws(FrontendError) {
        let logging = address.flags & VringAddress.logFlag != 0
        let ack = wantsAck(for: .setVringAddr, logging: logging)
        try request(.setVringAddr, payload: .vringAddress(address), needReply: ack)
        if ackPolicy == .likeQEMU { try barrierIfNoAck(logging) }
    }

    // MARK: dirty logging

    /// SET_LOG_BASE with `log`'s memfd, size and offset. The spec calls for a reply once LOG_SHMFD is
    /// negotiated; an empty one (what DPDK sends) or a u64 0 is accepted unless `requireU64Reply`.
    public func setLogBase(_ log: DirtyLogBuffer, requireU64Reply: Bool = false) throws(FrontendError) {
        try requireProtocol(VhostUserProtocolFeature.logShmfd, "SET_LOG_BASE", "LOG_SHMFD")
        let reply = try request(.setLogBase, payload: .log(log.logDescription), fds: [log.fd])
        lastLogBaseReply = reply
        if let reply {
            switch reply.payload.count {
            case 0 where !requireU64Reply:
                break
            case 8:
                if let s = reply.u64, s != 0 { throw .rejected(request: "SET_LOG_BASE", status: s) }
            default:
                throw .malformedReply(request: "SET_LOG_BASE", reason: "payload of \(reply.payload.count) bytes, expected \(requireU64Reply ? "8" : "0 or 8")")
            }
        }
        self.log = log
    }

    /// Starts dirty logging as QEMU does when migration begins: SET_LOG_BASE (a new log covering
    /// the memory table unless one is given), SET_FEATURES with VHOST_F_LOG_ALL, then SET_VRING_ADDR
    /// with VHOST_VRING_F_LOG and log_guest_addr = used-ring gpa for every set-up ring.
    @discardableResult
    public func enableLogging(log: DirtyLogBuffer? = nil, requireU64Reply: Bool = false) throws(FrontendError) -> DirtyLogBuffer {
        guard offeredFeatures & VirtioFeature.vhostLogAll != 0 else {
            throw .notNegotiated(step: "enableLogging", feature: "VHOST_F_LOG_ALL (not offered by GET_FEATURES)")
        }
        let buffer: DirtyLogBuffer
        if let log { buffer = log } else { buffer = try DirtyLogBuffer(covering: memoryTable) }
        try setLogBase(buffer, requireU64Reply: requireU64Reply)
        try switchLogging(on: true)
        return buffer
    }

    /// Stops dirty logging as QEMU does when migration is cancelled: SET_FEATURES without
    /// VHOST_F_LOG_ALL, then SET_VRING_ADDR without the log flag for every set-up ring.
    /// QEMU asks for no acknowledgement here, so the backend may still log for a while; with
    /// `waitForBackend` (the default) a `barrier()` follows, so that when this returns the backend
    /// has processed the switch-off. The log buffer stays readable.
    public func disableLogging(waitForBackend: Bool = true) throws(FrontendError) {
        try switchLogging(on: false)
        if waitForBackend { try barrier() }
    }

    /// A GET_FEATURES round trip: when it returns, the backend has processed every request sent
    /// before it (backends handle one connection's messages in order). QEMU's enforce_reply uses
    /// the same trick when REPLY_ACK is missing.
    public func barrier() throws(FrontendError) {
        _ = try getU64(.getFeatures)
    }

    private func switchLogging(on: Bool) throws(FrontendError) {
        let features = ackedFeatures | (on ? VirtioFeature.vhostLogAll : 0)
        try request(.setFeatures, payload: .u64(features), needReply: wantsAck(for: .setFeatures, logging: on))
        if ackPolicy == .likeQEMU { try barrierIfNoAck(on) }
        for index in rings.keys.sorted() {
            guard let ring = rings[index] else { continue }
            try sendVringAddress(try vringAddress(ring.addresses, logging: on))
        }
    }
}
