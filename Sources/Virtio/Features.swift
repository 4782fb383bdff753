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
    public static let mtu: UInt64 = 1 << 3
    public static let mac: UInt64 = 1 << 5
    public static let mrgRxbuf: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
    public static let ctrlVq: UInt64 = 1 << 17
    public static let guestAnnounce: UInt64 = 1 << 21
    public static let mq: UInt64 = 1 << 22
}

/// Names for feature bits, for logs and status output.
public func describeFeatures(_ bits: UInt64) -> String {
    let names: [(UInt64, String)] = [
        (VirtioNetFeature.csum, "CSUM"), (VirtioNetFeature.guestCsum, "GUEST_CSUM"),
        (VirtioNetFeature.mtu, "MTU"), (VirtioNetFeature.mac, "MAC"),
        (VirtioNetFeature.mrgRxbuf, "MRG_RXBUF"), (VirtioNetFeature.status, "STATUS"),
        (VirtioNetFeature.ctrlVq, "CTRL_VQ"), (VirtioNetFeature.guestAnnounce, "GUEST_ANNOUNCE"),
        (VirtioNetFeature.mq, "MQ"), (VirtioFeature.notifyOnEmpty, "NOTIFY_ON_EMPTY"),
        (VirtioFeature.vhostLogAll, "LOG_ALL"), (VirtioFeature.anyLayout, "ANY_LAYOUT"),
        (VirtioFeature.ringIndirectDesc, "INDIRECT_DESC"), (VirtioFeature.ringEventIdx, "EVENT_IDX"),
        (VirtioFeature.vhostUserProtocolFeatures, "PROTOCOL_FEATURES"), (VirtioFeature.version1, "VERSION_1"),
        (VirtioFeature.accessPlatform, "ACCESS_PLATFORM"), (VirtioFeature.ringPacked, "RING_PACKED"),
        (VirtioFeature.inOrder, "IN_ORDER"),
    ]
    var out: [String] = []
    var rest = bits
    for (bit, name) in names where bits & bit != 0 { out.append(name); rest &= ~bit }
    if rest != 0 { out.append("0x" + String(rest, radix: 16)) }
    return out.joined(separator: "|")
}
