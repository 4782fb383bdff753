// One input's run: a session, a SoftNIC behind DeviceBinding, the relay when a migration starts
// one, and the program loop (session-engine fuzz target: see main.swift). The operations are in
// RunFrontend.swift and RunGuest.swift.

#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Logging
import Platform
@testable import Relay
@testable import SoftNIC
@testable import VDPA
import VhostUser
import Virtio

final class Run {
    let device: SoftNIC
    let binding: DeviceBinding
    let session: BackendSession
    var regions: [GuestRegion] = []
    /// Our duplicate of each ring's kick eventfd, to ring its doorbell.
    var kicks: [Int: Int32] = [:]
    /// Next descriptor slot the "well-formed chain" operation uses, per ring.
    var nextSlot: [Int: UInt16] = [:]
    var alive = true

    init() throws {
        device = try SoftNIC(portID: "fuzz", queuePairs: 1, link: .loopback, guestMAC: nil, logger: logger)
        let config = Port.backendConfig(queuePairs: 1, device: device)  // what a port offers
        session = BackendSession(config: config, logger: logger)
        // The event loop: a relay thread that sleeps when idle (poll and hybrid would spin).
        binding = DeviceBinding(device: device, portID: "fuzz", relayMode: .event, migration: MigrationStatsTable(),
                                testSwitches: TestSwitches(), logger: logger)
        session.hooks = binding
    }

    func teardown() {
        if verbose { for c in device.counters() { print("queue \(c.index): \(c)") } }
        session.close()
        device.close()
        // The relay thread (if a migration started one) stops when the binding goes (its deinit).
        for (_, fd) in kicks { close(fd) }
        kicks.removeAll()
        regions.removeAll()
    }

    var ringCount: Int { session.vrings.count }

    /// Lets the device and the relay finish what the rings hold now.
    func settle() {
        _ = device.serviceUntilIdle(maxPasses: 64)
        if let relay = binding.relay {
            do {
                try relay.perform { e in
                    for q in e.active {
                        var steps = 0
                        while steps < 64 && e.step(q) > 0 { steps += 1 }
                    }
                }
            } catch {
                // The relay has stopped (the binding's reset did it): nothing left to settle.
            }
            // The relay rings the device's doorbell for buffers the guest posted while it slept.
            _ = device.serviceUntilIdle(maxPasses: 64)
        }
    }

    func kick(_ input: inout Input) {
        let i = Int(input.u8()) % ringCount
        if let fd = kicks[i] { EventFD.signal(fd) }
        settle()
    }

    // MARK: the program

    func execute(_ input: inout Input) {
        var ops = 0
        while !input.done && alive && ops < 96 {
            ops += 1
            let op = input.u8() % 22
            if verbose { print("op \(op) at byte \(input.at - 1)") }
            switch op {
            case 0:
                var f = input.u64()
                if input.u8() & 0x0f != 0 { f &= session.config.virtioFeatures }
                send(.setFeatures, .u64(f))
            case 1:
                var f = input.u64()
                if input.u8() & 0x0f != 0 { f &= session.config.protocolFeatures }
                send(.setProtocolFeatures, .u64(f))
            case 2: setMemTable(&input)
            case 3: addMemReg(&input)
            case 4: remMemReg(&input)
            case 5: setLogBase(&input)
            case 6:
                let index = ringIndex(&input)
                let b = input.u8()
                let num = b & 0x80 != 0 ? input.u32() : UInt32(1) << UInt32(b % 9)
                send(.setVringNum, .vringState(VringState(index: index, num: num)))
            case 7: setVringAddr(&input)
            case 8:
                let index = ringIndex(&input)
                let b = input.u8()
                send(.setVringBase, .vringState(VringState(index: index, num: b & 0x80 != 0 ? input.u32() : UInt32(input.u16()))))
            case 9:
                send(.getVringBase, .vringState(VringState(index: ringIndex(&input), num: 0)))
            case 10: setVringFile(&input, .setVringKick)
            case 11: setVringFile(&input, .setVringCall)
            case 12:
                let index = ringIndex(&input)
                send(.setVringEnable, .vringState(VringState(index: index, num: UInt32(input.u8() % 3))))
            case 13: misc(&input)
            case 14, 15: guestDescriptor(&input)
            case 16: guestIndirectTable(&input)
            case 17, 18: guestAvail(&input)
            case 19: guestRawWrite(&input)
            case 20: guestGoodChain(&input)
            default: kick(&input)
            }
        }
        if alive { settle() }
    }
}
