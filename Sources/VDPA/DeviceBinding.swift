import Logging
import Platform
import VhostUser

/// Drives a vDPA device from a vhost-user session's events. Lives on the port's thread; every
/// hook finishes (the device has applied the change) before the message is answered.
final class DeviceBinding: VhostUserDeviceHooks {
    let device: any VDPADevice
    let logger: Logger
    private var started: Set<Int> = []

    init(device: any VDPADevice, logger: Logger) {
        self.device = device
        self.logger = logger
    }

    func memoryTableChanged(_ session: BackendSession) {
        device.setMemoryTable(session.memory.current())
    }

    func vringStarted(_ session: BackendSession, index: Int) {
        let v = session.vrings[index]
        device.setMemoryTable(session.memory.current())
        device.startRing(VDPARingConfig(index: index, size: UInt16(truncatingIfNeeded: v.size), descGPA: v.descGPA, availGPA: v.availGPA,
                                        usedGPA: v.usedGPA, base: UInt16(truncatingIfNeeded: v.base), kick: v.kick, call: v.call,
                                        enabled: v.enabled))
        started.insert(index)
    }

    func vringStopping(_ session: BackendSession, index: Int) -> UInt32? {
        guard started.remove(index) != nil else { return nil }
        return UInt32(device.stopRing(index))
    }

    func vringEnableChanged(_ session: BackendSession, index: Int, enabled: Bool) {
        if started.contains(index) { device.setRingEnabled(index, enabled) }
    }

    func vringCallChanged(_ session: BackendSession, index: Int) {
        if started.contains(index) { device.setRingCall(index, session.vrings[index].call) }
    }

    func featuresChanged(_ session: BackendSession) {
        device.setFeatures(session.ackedFeatures)
        for i in started { device.setRingEnabled(i, session.vrings[i].enabled) }
        if session.logAllEnabled {
            logger.error("""
                dirty logging (VHOST_F_LOG_ALL) is on, but the migration relay is NOT IMPLEMENTED yet: \
                the device's writes to guest memory are not logged, so a live migration now can lose data
                """)
        }
    }

    func logChanged(_ session: BackendSession) {}

    func sendRARP(_ session: BackendSession, mac: [UInt8]) -> Bool {
        device.sendRARP(mac: mac)
    }

    func statusChanged(_ session: BackendSession) {}

    func reset(_ session: BackendSession) {
        started.removeAll()
        device.reset()
    }
}
