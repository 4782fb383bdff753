import Virtio

/// The virtio-net feature sets the framework knows, in one place.
public enum VirtioNetFeatureSet {
    /// The data-path features the relay can migrate: split rings with mergeable RX buffers,
    /// several queue pairs, EVENT_IDX and indirect descriptors (the relay walks indirect tables
    /// to mark what the device wrote). A port offers a device's features within this set; bits
    /// outside it (packed rings, offloads) need the relay to learn them first. The control queue,
    /// the MAC and the link status are not in it: QEMU keeps those for vhost-user.
    public static let migratable: UInt64 =
        VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.mq | VirtioNetFeature.mtu
        | VirtioFeature.ringEventIdx | VirtioFeature.ringIndirectDesc | VirtioNetFeature.guestAnnounce

}
