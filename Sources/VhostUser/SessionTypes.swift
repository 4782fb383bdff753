import Platform
import Virtio

/// What a port offers to its frontend. The vhost-user layer knows no device: the port fills in
/// the virtio features from its device.
public struct BackendConfig: Sendable {
    public var queuePairs: Int
    public var virtioFeatures: UInt64
    public var protocolFeatures: UInt64
    public var maxMemSlots: Int
    /// Most bytes of the frontend's files (guest memory plus dirty log) one session may map.
    public var maxMappedBytes: UInt64
    /// Guest memory regions must end at or below this guest-physical address (the port reserves
    /// the IOVA space above it for its own mappings).
    public var guestPhysLimit: UInt64

    /// vhost-user's own feature bits, which every port offers whatever its device: dirty logging
    /// (VHOST_F_LOG_ALL) and the protocol features.
    public static let vhostUserFeatures: UInt64 = VirtioFeature.vhostLogAll | VirtioFeature.vhostUserProtocolFeatures

    /// The protocol features the session implements.
    public static let offeredProtocolFeatures: UInt64 =
        VhostUserProtocolFeature.mq | VhostUserProtocolFeature.logShmfd | VhostUserProtocolFeature.rarp
        | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.netMTU | VhostUserProtocolFeature.backendReq
        | VhostUserProtocolFeature.configureMemSlots | VhostUserProtocolFeature.resetDevice
        | VhostUserProtocolFeature.status

    /// `virtioFeatures` is the device's set plus `vhostUserFeatures`.
    public init(queuePairs: Int = 1, virtioFeatures: UInt64, protocolFeatures: UInt64 = BackendConfig.offeredProtocolFeatures,
                maxMemSlots: Int = 32, maxMappedBytes: UInt64 = BackendConfig.defaultMaxMappedBytes,
                guestPhysLimit: UInt64 = .max) {
        self.maxMappedBytes = maxMappedBytes
        self.queuePairs = queuePairs
        self.virtioFeatures = virtioFeatures
        self.protocolFeatures = protocolFeatures
        self.maxMemSlots = maxMemSlots
        self.guestPhysLimit = guestPhysLimit
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
    /// Where writes to the used ring are logged: the log address the frontend gave with the log
    /// flag, else the used ring's guest-physical address.
    public var usedLogGPA: UInt64 {
        if let a = address, a.flags & VringAddress.logFlag != 0 { return a.logGuestAddr }
        return usedGPA
    }
}

/// A ring that has started, as the session hands it to the device side: where its areas are in
/// guest-physical space, where it starts, how it signals, and whether it is enabled.
public struct RingSetup: Sendable {
    public var index: Int
    public var size: UInt16
    public var descGPA: UInt64
    public var availGPA: UInt64
    public var usedGPA: UInt64
    /// Where writes to the used ring are logged (see `VringConfig.usedLogGPA`).
    public var usedLogGPA: UInt64
    /// The next avail index the device reads; the used index starts equal to it.
    public var base: UInt16
    /// nil = the frontend asked the device to poll the ring.
    public var kick: SharedFD?
    public var call: SharedFD?
    public var enabled: Bool

    public init(index: Int, size: UInt16, descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64, usedLogGPA: UInt64,
                base: UInt16, kick: SharedFD?, call: SharedFD?, enabled: Bool) {
        self.index = index; self.size = size; self.descGPA = descGPA; self.availGPA = availGPA; self.usedGPA = usedGPA
        self.usedLogGPA = usedLogGPA; self.base = base; self.kick = kick; self.call = call; self.enabled = enabled
    }
}

/// The device side of a session: what a port installs to hear of the changes a frontend makes.
/// Each event carries the values it is about (a ring's setup, the new memory table, the new
/// log), never the session. Every call runs on the port's thread while the message that caused
/// it is handled, so it finishes before that message is answered. A call that throws fails the
/// message: the session closes the connection (the frontend must never be told that a change it
/// asked for, such as logging, is in place when it is not).
public protocol VhostUserDeviceHooks: AnyObject {
    /// SET_FEATURES: the negotiated virtio features, and every ring's enable state (which
    /// SET_FEATURES changes when PROTOCOL_FEATURES was not negotiated).
    func featuresChanged(_ features: UInt64, ringsEnabled: [Bool]) throws(VhostUserError)
    /// The memory table changed (SET_MEM_TABLE, ADD/REM_MEM_REG).
    func memoryTableChanged(_ table: GuestMemoryTable) throws(VhostUserError)
    /// A ring started (all of size, addresses and kick are set).
    func vringStarted(_ ring: RingSetup) throws(VhostUserError)
    /// Ring `index` must stop now; returns the index the device will resume from (split: its
    /// last avail index), or nil if the device never ran it.
    func vringStopping(_ index: Int) throws(VhostUserError) -> UInt32?
    func vringEnableChanged(_ index: Int, enabled: Bool) throws(VhostUserError)
    /// The call eventfd of a running ring changed.
    func vringCallChanged(_ index: Int, call: SharedFD?) throws(VhostUserError)
    /// A running ring's used-ring log address changed (SET_VRING_ADDR with the log flag toggled).
    func usedLogAddressChanged(_ index: Int, usedLogGPA: UInt64) throws(VhostUserError)
    /// SET_LOG_BASE gave a new log, or logging ended and the session dropped it (nil).
    func logChanged(_ log: DirtyLog?) throws(VhostUserError)
    /// SEND_RARP for `mac`; false if the device cannot send it.
    func sendRARP(mac: [UInt8]) -> Bool
    func statusChanged(_ status: UInt8)
    /// The frontend reset the device or went away: stop everything, forget memory and log.
    func reset()
}
