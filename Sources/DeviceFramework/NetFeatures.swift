import Virtio

/// The virtio-net feature sets the framework knows, in one place.
public enum VirtioNetFeatureSet {
    /// The data-path features the relay can migrate: split rings with mergeable RX buffers,
    /// several queue pairs, EVENT_IDX and indirect descriptors (the relay walks indirect tables
    /// to mark what the device wrote), and the checksum and segmentation offloads (they change
    /// what the virtio-net header says, never which bytes the device writes: the relay marks
    /// them the same). A port offers a device's features within this set; bits outside it
    /// (packed rings) need the relay to learn them first. The control queue, the MAC and the
    /// link status are not in it: QEMU keeps those for vhost-user.
    public static let migratable: UInt64 =
        VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.mq | VirtioNetFeature.mtu
        | VirtioFeature.ringEventIdx | VirtioFeature.ringIndirectDesc | VirtioNetFeature.guestAnnounce
        | VirtioNetFeature.offloads

}
