import SoftNIC
import Virtio

/// What VDUSE_CREATE_DEV and VDUSE_VQ_SETUP are given for a SoftNIC: a virtio-net device, its
/// features, its config space and its queues.
public struct VDUSEDeviceConfig: Equatable, Sendable {
    /// VIRTIO_ID_NET.
    public static let deviceID: UInt32 = 1
    public static let vendorID: UInt32 = 0
    /// VIRTIO_NET_S_LINK_UP.
    public static let linkUp: UInt16 = 1
    public static let mtu: UInt16 = 1500
    /// Each ring's largest size (VDUSE_VQ_SETUP's max_size); the driver picks a power of two up to it.
    public static let maxQueueSize: UInt16 = 256
    /// Where the driver aligns each ring's used area (vq_align: a power of two, 4...PAGE_SIZE).
    public static let queueAlignment: UInt32 = 4096
    /// sizeof(struct virtio_net_config) in Linux 6.12: mac, status, max_virtqueue_pairs, mtu,
    /// speed, duplex, RSS fields. The whole struct is given, so a driver reading any field of it
    /// (QEMU reads it whole through vhost-vdpa) stays inside the config space.
    public static let configSize = 24

    public let mac: [UInt8]
    public let queuePairs: Int
    /// Whether INDIRECT_DESC is offered (`indirect=off` in the spec: for QEMU 7.2's x-svq=on).
    public let indirect: Bool

    public init(mac: [UInt8], queuePairs: Int, indirect: Bool = true) {
        precondition(mac.count == 6 && queuePairs >= 1)
        self.mac = mac
        self.queuePairs = queuePairs
        self.indirect = indirect
    }

    public init(_ spec: VDUSESpec) { self.init(mac: spec.configMAC, queuePairs: spec.queuePairs, indirect: spec.indirect) }

    /// The features offered: what the SoftNIC implements, without GUEST_ANNOUNCE (it needs the
    /// control queue), plus VERSION_1 (VDUSE requires it of net devices), ACCESS_PLATFORM (VDUSE
    /// requires it of every device: the driver's addresses are IOVAs) and the config fields MAC,
    /// STATUS and MTU; MQ only with several queue pairs. Never CTRL_VQ: VDUSE refuses net devices
    /// with a control queue (features_is_valid in vduse_dev.c). Without INDIRECT_DESC when
    /// `indirect` is false.
    public var features: UInt64 {
        var f = SoftNIC.deviceFeatures & ~(VirtioNetFeature.guestAnnounce | VirtioNetFeature.mq | VirtioNetFeature.ctrlVq)
        f |= VirtioFeature.version1 | VirtioFeature.accessPlatform
        f |= VirtioNetFeature.mac | VirtioNetFeature.status | VirtioNetFeature.mtu
        if queuePairs > 1 { f |= VirtioNetFeature.mq }
        if !indirect { f &= ~VirtioFeature.ringIndirectDesc }
        return f
    }

    /// The number of virtqueues: an RX and a TX ring per pair, no control queue.
    public var queueCount: Int { 2 * queuePairs }

    /// The config space (struct virtio_net_config, little-endian as VERSION_1 makes it).
    public var configSpace: [UInt8] {
        var c = [UInt8](repeating: 0, count: Self.configSize)
        c.replaceSubrange(0..<6, with: mac)
        func put16(_ v: UInt16, at o: Int) { c[o] = UInt8(v & 0xff); c[o + 1] = UInt8(v >> 8) }
        put16(Self.linkUp, at: 6)
        put16(UInt16(queuePairs), at: 8)
        put16(Self.mtu, at: 10)
        return c
    }
}
