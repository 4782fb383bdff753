/// Virtio and vhost feature bits (virtio 1.2 spec, section 6 and 5.1.3; vhost-user.rst).
public enum VirtioFeature {
    public static let notifyOnEmpty: UInt64 = 1 << 24
    public static let anyLayout: UInt64 = 1 << 27
    public static let ringIndirectDesc: UInt64 = 1 << 28
    public static let ringEventIdx: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
    public static let accessPlatform: UInt64 = 1 << 33
    public static let ringPacked: UInt64 = 1 << 34
    public static let inOrder: UInt64 = 1 << 35

    /// VHOST_F_LOG_ALL: the frontend asks for dirty-page logging of all guest writes.
    public static let vhostLogAll: UInt64 = 1 << 26
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    public static let vhostUserProtocolFeatures: UInt64 = 1 << 30
}

public enum VirtioNetFeature {
    public static let csum: UInt64 = 1 << 0
    public static let guestCsum: UInt64 = 1 << 1
    public static let ctrlGuestOffloads: UInt64 = 1 << 2
    public static let mtu: UInt64 = 1 << 3
    public static let mac: UInt64 = 1 << 5
    public static let guestTSO4: UInt64 = 1 << 7
    public static let guestTSO6: UInt64 = 1 << 8
    public static let guestECN: UInt64 = 1 << 9
    public static let guestUFO: UInt64 = 1 << 10
    public static let hostTSO4: UInt64 = 1 << 11
    public static let hostTSO6: UInt64 = 1 << 12
    public static let hostECN: UInt64 = 1 << 13
    public static let hostUFO: UInt64 = 1 << 14
    public static let mrgRxbuf: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
    public static let ctrlVq: UInt64 = 1 << 17
    public static let ctrlRx: UInt64 = 1 << 18
    public static let ctrlVlan: UInt64 = 1 << 19
    public static let guestAnnounce: UInt64 = 1 << 21
    public static let mq: UInt64 = 1 << 22
    public static let ctrlMacAddr: UInt64 = 1 << 23

    /// The checksum and segmentation offloads (what QEMU 7.2's virtio-net and DPDK's vhost
    /// backend negotiate): the device's (HOST_*, CSUM: the guest sends partial checksums and
    /// large segments) and the guest's (GUEST_*: the guest takes them).
    public static let hostOffloads: UInt64 = csum | hostTSO4 | hostTSO6 | hostECN | hostUFO
    public static let guestOffloads: UInt64 = guestCsum | guestTSO4 | guestTSO6 | guestECN | guestUFO
    public static let offloads: UInt64 = hostOffloads | guestOffloads
}

/// The feature bits that have names, in the order logs and status print them.
public enum VirtioFeatureName {
    public static let all: [(bit: UInt64, name: String)] = [
        (VirtioNetFeature.csum, "CSUM"), (VirtioNetFeature.guestCsum, "GUEST_CSUM"),
        (VirtioNetFeature.ctrlGuestOffloads, "CTRL_GUEST_OFFLOADS"),
        (VirtioNetFeature.mtu, "MTU"), (VirtioNetFeature.mac, "MAC"),
        (VirtioNetFeature.guestTSO4, "GUEST_TSO4"), (VirtioNetFeature.guestTSO6, "GUEST_TSO6"),
        (VirtioNetFeature.guestECN, "GUEST_ECN"), (VirtioNetFeature.guestUFO, "GUEST_UFO"),
        (VirtioNetFeature.hostTSO4, "HOST_TSO4"), (VirtioNetFeature.hostTSO6, "HOST_TSO6"),
        (VirtioNetFeature.hostECN, "HOST_ECN"), (VirtioNetFeature.hostUFO, "HOST_UFO"),
        (VirtioNetFeature.mrgRxbuf, "MRG_RXBUF"), (VirtioNetFeature.status, "STATUS"),
        (VirtioNetFeature.ctrlVq, "CTRL_VQ"), (VirtioNetFeature.ctrlRx, "CTRL_RX"),
        (VirtioNetFeature.ctrlVlan, "CTRL_VLAN"), (VirtioNetFeature.guestAnnounce, "GUEST_ANNOUNCE"),
        (VirtioNetFeature.mq, "MQ"), (VirtioNetFeature.ctrlMacAddr, "CTRL_MAC_ADDR"), (VirtioFeature.notifyOnEmpty, "NOTIFY_ON_EMPTY"),
        (VirtioFeature.vhostLogAll, "LOG_ALL"), (VirtioFeature.anyLayout, "ANY_LAYOUT"),
        (VirtioFeature.ringIndirectDesc, "INDIRECT_DESC"), (VirtioFeature.ringEventIdx, "EVENT_IDX"),
        (VirtioFeature.vhostUserProtocolFeatures, "PROTOCOL_FEATURES"), (VirtioFeature.version1, "VERSION_1"),
        (VirtioFeature.accessPlatform, "ACCESS_PLATFORM"), (VirtioFeature.ringPacked, "RING_PACKED"),
        (VirtioFeature.inOrder, "IN_ORDER"),
    ]

    /// The bit named `name` (as `names(of:)` prints it, in any ASCII case), or nil.
    public static func bit(named name: some StringProtocol) -> UInt64? {
        // ASCII only: Unicode case mapping would take "ſ" for "S".
        guard name.utf8.allSatisfy({ $0 < 0x80 }) else { return nil }
        let upper = name.uppercased()
        return all.first { $0.name == upper }?.bit
    }

    /// The names of the bits in `bits`, then any bits without a name as one hex number (`0x...`).
    public static func names(of bits: UInt64) -> [String] {
        var out: [String] = []
        var rest = bits
        for (bit, name) in all where bits & bit != 0 { out.append(name); rest &= ~bit }
        if rest != 0 { out.append("0x" + String(rest, radix: 16)) }
        return out
    }
}

/// Names for feature bits, for logs and status output (`|`-separated).
public func describeFeatures(_ bits: UInt64) -> String {
    VirtioFeatureName.names(of: bits).joined(separator: "|")
}
