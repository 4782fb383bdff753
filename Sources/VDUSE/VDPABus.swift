import Platform

/// Why a VDUSE device could not be created, bound or removed: which step, and why.
public struct VDUSEError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The vDPA bus in sysfs: which kernel driver a device is bound to, and binding another. The
/// kernel binds a new device to the first loaded driver that matches (autoprobe), so the wanted
/// one is bound after unbinding that. Binding or unbinding runs the driver's probe or remove,
/// which talks to the device: the device must be served meanwhile.
public struct VDPABus: Sendable {
    public let root: String

    public init(root: String = "/sys/bus/vdpa") { self.root = root }

    /// The driver device `name` is bound to (its sysfs name, e.g. "virtio_vdpa"), nil if none.
    public func driver(of name: String) throws(VDUSEError) -> String? {
        let link = "\(root)/devices/\(name)/driver"
        do {
            guard let target = try FileSystem.linkTarget(link) else { return nil }
            return target.split(separator: "/").last.map(String.init)
        } catch {
            throw VDUSEError("vDPA device \(name): cannot read \(link): \(error)")
        }
    }

    /// Binds device `name` to `driver` (unbinding whatever the kernel bound first); `.none`
    /// leaves it unbound.
    public func bind(_ name: String, to driver: VDPABusDriver) throws(VDUSEError) {
        guard FileSystem.exists("\(root)/devices/\(name)") else {
            throw VDUSEError("vDPA device \(name): \(root)/devices/\(name) does not exist (the device is not on the vDPA bus)")
        }
        let current = try self.driver(of: name)
        if current == driver.sysfsName { return }
        if let current {
            let unbind = "\(root)/drivers/\(current)/unbind"
            do { try FileSystem.writeAttribute(unbind, name) } catch {
                throw VDUSEError("vDPA device \(name): cannot unbind it from \(current) (\(unbind)): \(error)")
            }
        }
        guard let wanted = driver.sysfsName else { return }
        let bind = "\(root)/drivers/\(wanted)/bind"
        guard FileSystem.exists(bind) else {
            throw VDUSEError("vDPA device \(name): no driver \(wanted) on the vDPA bus (\(bind) is missing: load the \(wanted) module)")
        }
        do { try FileSystem.writeAttribute(bind, name) } catch {
            throw VDUSEError("vDPA device \(name): binding it to \(wanted) (\(bind)) failed: \(error)")
        }
    }
}
