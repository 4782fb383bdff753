import DeviceFramework
import Virtio
import VhostUser

/// The JSON the control socket answers to `status` (documented in docs/CONTROL.md).
/// Later versions add keys; none is renamed.
public struct DaemonStatus: Codable, Sendable, Equatable {
    public var ok: Bool
    public var ports: [PortStatus]
}

public struct FeatureStatus: Codable, Sendable, Equatable {
    public var offered: String
    public var acked: String
    public var ackedNames: String
    /// The offered bits' names, as `ackedNames`. Absent in older replies.
    public var offeredNames: String? = nil
    /// The port's `features=` and `offloads=` options (e.g. `features=VERSION_1+MRG_RXBUF,offloads=off`)
    /// when they restrict what it offers; absent otherwise, in `protocolFeatures` and in older replies.
    public var limit: String? = nil
}

public struct RegionStatus: Codable, Sendable, Equatable {
    public var guestPhysAddr: String
    public var size: String
    public var userAddr: String
    public var mmapOffset: String
}

public struct QueueStatus: Codable, Sendable, Equatable {
    public var index: Int
    public var enabled: Bool
    public var started: Bool
    public var ringSize: Int
    /// "none" while no device serves the port; once one does, a `RingMode`: "direct", "held" or "relay".
    public var mode: String
    public var kick: String
    public var call: Bool
    public var base: Int
    public var logging: Bool
    /// Guest-physical addresses of the ring's areas (hex strings; "0x0" until set).
    public var descGPA: String?
    public var availGPA: String?
    public var usedGPA: String?
}

public struct LogStatus: Codable, Sendable, Equatable {
    public var logAll: Bool
    public var sizeBytes: Int
    public var outOfRangeMarks: UInt64
}

public struct PortStatus: Codable, Sendable, Equatable {
    public var id: String
    public var socket: String
    public var role: String
    /// "listening", "connected", "connecting" (client mode, retrying) or "closed".
    public var connection: String
    public var device: String
    /// The device's details (a kernel vDPA device's features, backend features, switchover kind,
    /// status and rings); absent for the software NIC and in older replies.
    public var deviceDetails: DeviceDetails?
    public var features: FeatureStatus
    public var protocolFeatures: FeatureStatus
    public var memoryRegions: [RegionStatus]
    public var queues: [QueueStatus]
    public var log: LogStatus?
    public var deviceStatus: Int
    public var mtu: Int?
    public var connections: Int
    public var rejectedConnections: Int
    public var lastError: String?
    /// How the port logs a live migration (`migration=`, `relay=`, `log=`); absent in older replies.
    public var migrationSettings: MigrationSettings?
}

/// A port's `migration=`, `relay=` and `log=` options, as given (or their defaults).
public struct MigrationSettings: Codable, Sendable, Equatable {
    public var method: String
    public var relay: String
    public var log: String
    public init(_ o: MigrationOptions) {
        method = o.method.rawValue
        relay = o.relay.rawValue
        log = o.log.rawValue
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

extension PortStatus {
    static let noDevice = "none: this port has no device; it negotiates but serves no data path"

    init(spec: PortSpec, config: BackendConfig) {
        id = spec.id
        socket = spec.socketPath
        role = spec.client ? "client" : "server"
        connection = spec.client ? "connecting" : "listening"
        device = Self.noDevice
        features = FeatureStatus(offered: hex(config.virtioFeatures), acked: hex(0), ackedNames: "",
                                 offeredNames: describeFeatures(config.virtioFeatures), limit: spec.featureLimitDescription)
        protocolFeatures = FeatureStatus(offered: hex(config.protocolFeatures), acked: hex(0), ackedNames: "",
                                         offeredNames: VhostUserProtocolFeature.describe(config.protocolFeatures))
        memoryRegions = []
        queues = (0..<config.ringCount).map {
            QueueStatus(index: $0, enabled: false, started: false, ringSize: 0, mode: "none", kick: "none", call: false, base: 0, logging: false,
                        descGPA: nil, availGPA: nil, usedGPA: nil)
        }
        log = nil
        deviceStatus = 0
        mtu = nil
        connections = 0
        rejectedConnections = 0
        lastError = nil
        migrationSettings = MigrationSettings(spec.migration)
    }

    /// Refreshes the session-derived fields from a live session.
    mutating func update(from s: BackendSession) {
        features.acked = hex(s.ackedFeatures)
        features.ackedNames = describeFeatures(s.ackedFeatures)
        protocolFeatures.acked = hex(s.ackedProtocolFeatures)
        protocolFeatures.ackedNames = VhostUserProtocolFeature.describe(s.ackedProtocolFeatures)
        memoryRegions = s.memory.current().regions.map {
            RegionStatus(guestPhysAddr: hex($0.guestPhysAddr), size: hex($0.size), userAddr: hex($0.userAddr),
                         mmapOffset: hex($0.description.mmapOffset))
        }
        queues = s.vrings.enumerated().map { i, v in
            QueueStatus(index: i, enabled: v.enabled, started: v.started, ringSize: Int(v.size), mode: "none",
                        kick: v.kick != nil ? "eventfd" : (v.kickPolling ? "polling" : "none"),
                        call: v.call != nil, base: Int(v.base), logging: v.logging,
                        descGPA: hex(v.descGPA), availGPA: hex(v.availGPA), usedGPA: hex(v.usedGPA))
        }
        log = s.log.map { LogStatus(logAll: s.logAllEnabled, sizeBytes: $0.byteCount, outOfRangeMarks: $0.outOfRangeMarks) }
        deviceStatus = Int(s.status)
        mtu = s.mtu.map { Int($0) }
    }

    /// Clears the session-derived fields after a disconnect.
    mutating func clearSession(spec: PortSpec, config: BackendConfig) {
        let keep = (connections, rejectedConnections, lastError, connection, device)
        self = PortStatus(spec: spec, config: config)
        (connections, rejectedConnections, lastError, connection, device) = keep
    }
}

/// The JSON the control socket answers to `stats` (docs/CONTROL.md).
public struct DaemonStats: Codable, Sendable, Equatable {
    public var ok: Bool
    public var ports: [PortStats]
}

public struct PortStats: Codable, Sendable, Equatable {
    public var id: String
    public var device: String
    public var queues: [QueueStats]
    /// The port's relay thread, once a migration has started one.
    public var relay: RelayStats?
    /// How long the SET_FEATURES messages that toggled LOG_ALL took to answer; absent in older replies.
    public var logAllReplies: LogAllReplyStats?
    /// `migration=iommu-dirty` ports only: the device's dirty tracking and its folds.
    public var dirtyTracking: DirtyTrackingStats? = nil
}

public struct RelayStats: Codable, Sendable, Equatable {
    /// "event", "poll" or "hybrid".
    public var loop: String
    /// The relay thread's CPU time so far.
    public var cpuMillis: UInt64
    /// CPU time spent in relay polls that found work, the elements they moved, and the ratio.
    public var busyNanos: UInt64
    public var busyElements: UInt64
    public var busyNanosPerElement: Double
}

public struct QueueStats: Codable, Sendable, Equatable {
    public var index: Int
    /// "rx" (device to guest, even rings) or "tx" (guest to device, odd rings).
    public var direction: String
    /// A `RingMode` ("direct", "held" or "relay") while the ring runs, "stopped" otherwise.
    public var mode: String
    public var packets: UInt64
    public var bytes: UInt64
    public var drops: [String: UInt64]
    public var faults: UInt64
    public var error: String?
    public var interrupts: UInt64
    public var doorbells: UInt64
    /// Used elements the relay copied to the guest for this ring.
    public var relayed: UInt64
    /// Page marks the relay made for buffers this ring's device wrote.
    public var pagesMarked: UInt64
    /// Direct ↔ relay switches of this ring, and how long the last one held the ring.
    public var switchovers: Int
    public var lastSwitchoverGapMicros: UInt64
    /// False when the device reports no counters for this queue (a kernel vDPA device without
    /// vendor statistics): packets, bytes, drops, faults, interrupts and doorbells are then 0
    /// because nobody counted, not because nothing moved. Absent in replies of older versions.
    public var deviceCounters: Bool? = true
    /// Errors the relay met on this ring (docs/CONTROL.md lists them: a chain it could not walk to
    /// mark, a device index more than a ring ahead, ring areas that do not translate, a blocking
    /// guest call eventfd). Absent in older replies.
    public var relayErrors: UInt64? = 0
    /// Chains the avail relay (`relay=avail+used`) refused: they broke a descriptor rule, were
    /// completed to the guest with length 0 and never reached the device. Absent in older replies.
    public var rejectedChains: UInt64? = 0
}
