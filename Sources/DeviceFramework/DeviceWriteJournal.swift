/// Test-only: a journal of device writes into guest memory while dirty logging is on
/// (VDPAD_TEST_JOURNAL, checked by tests/peers/lib/migration-oracle.py). The relay writes it in
/// `migration=relay` (what it exposed and marked); a device with its own dirty tracking writes it
/// in `migration=iommu-dirty` (what it wrote while tracking). One call per written range:
/// `length` bytes at `gpa`, the FNV-1a 64 checksum of the bytes as they are when recorded,
/// whether the range was marked dirty (by the relay in the log, or by the device in its IOMMU's
/// bits), and the used index whose publication exposes it to the guest.
public protocol DeviceWriteJournal: AnyObject, Sendable {
    func record(ring: Int, gpa: UInt64, length: UInt32, checksum: UInt64, marked: Bool, publishIndex: UInt16)
}
