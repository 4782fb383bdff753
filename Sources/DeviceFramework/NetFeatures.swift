import Virtio

/// The virtio-net feature sets the framework knows, in one place.
public enum VirtioNetFeatureSet {
    /// The data-path features the relay can migrate: split rings with mergeable RX buffers,
    /// several queue pairs, EVENT_IDX and indirect descriptors (the relay walks indirect tables
    /// to mark what the device wrote). A port offers a device's features within this set; bits
    /// outside it (packed rings, offloads) need the relay to learn them first.
    public static let migratable: UInt64 =
        VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.mq | VirtioNetFeature.mtu
        | VirtioFeature.ringEventIdx | VirtioFeature.ringIndirectDesc | VirtioNetFeature.guestAnnounce

    /// What stays with the frontend whatever the device: QEMU keeps the control queue, the MAC
    /// and the link status for vhost-user, so a port never offers these.
    public static let frontendOwned: UInt64 = VirtioNetFeature.ctrlVq | VirtioNetFeature.mac | VirtioNetFeature.status
}
