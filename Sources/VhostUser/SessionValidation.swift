import Platform
import Virtio

/// Layer 5 checks of the session (docs/ARCHITECTURE.md, "Validation layers") and the per-session cap on mapped bytes.
extension BackendSession {
    /// Checks new regions: non-empty, no address overflow, page-aligned, and no overlap with each
    /// other or with `existing` (in guest-physical or frontend-virtual space).
    func validateRegions(_ new: [MemoryRegionDescription], against existing: [MemoryRegionDescription], request: String) throws(VhostUserError) {
        var all = existing
        for (i, d) in new.enumerated() {
            let field = new.count > 1 ? "regions[\(i)]" : "region"
            guard d.size > 0 else { throw VhostUserError(.semantics, request, field: "\(field).memory_size", "zero") }
            guard !d.guestPhysAddr.addingReportingOverflow(d.size).overflow else {
                throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr", "0x\(String(d.guestPhysAddr, radix: 16)) + size overflows")
            }
            guard d.guestPhysAddr + d.size <= config.guestPhysLimit else {
                throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr",
                                     "[0x\(String(d.guestPhysAddr, radix: 16)), +0x\(String(d.size, radix: 16))) reaches the daemon's reserved IOVA range at 0x\(String(config.guestPhysLimit, radix: 16))")
            }
            guard !d.userAddr.addingReportingOverflow(d.size).overflow else {
                throw VhostUserError(.semantics, request, field: "\(field).userspace_addr", "0x\(String(d.userAddr, radix: 16)) + size overflows")
            }
            for o in all {
                if d.guestPhysAddr < o.guestPhysAddr + o.size && o.guestPhysAddr < d.guestPhysAddr + d.size {
                    throw VhostUserError(.semantics, request, field: "\(field).guest_phys_addr",
                                         "[0x\(String(d.guestPhysAddr, radix: 16)), +0x\(String(d.size, radix: 16))) overlaps the region at 0x\(String(o.guestPhysAddr, radix: 16))")
                }
                if d.userAddr < o.userAddr + o.size && o.userAddr < d.userAddr + d.size {
                    throw VhostUserError(.semantics, request, field: "\(field).userspace_addr",
                                         "0x\(String(d.userAddr, radix: 16)) overlaps another region's addresses")
                }
            }
            all.append(d)
        }
    }

    /// Translates and checks one ring's addresses against the current memory table.
    func translate(_ a: VringAddress, ring i: Int, request: String) throws(VhostUserError) {
        let table = memory.current()
        guard !table.regions.isEmpty else {
            throw VhostUserError(.semantics, request, field: "desc_user_addr", "no memory table yet")
        }
        let n = UInt64(max(vrings[i].size, 1))
        let eventIdx: UInt64 = 2
        let areas: [(String, UInt64, UInt64, UInt64)] = [
            ("desc_user_addr", a.descUserAddr, 16 * n, 16),
            ("avail_user_addr", a.availUserAddr, 4 + 2 * n + eventIdx, 2),
            ("used_user_addr", a.usedUserAddr, 4 + 8 * n + eventIdx, 4),
        ]
        var gpas: [UInt64] = []
        for (field, addr, len, align) in areas {
            guard addr % align == 0 else {
                throw VhostUserError(.semantics, request, field: field, "0x\(String(addr, radix: 16)) is not \(align)-byte aligned")
            }
            guard let gpa = table.guestPhysAddr(userAddr: addr, length: len) else {
                throw VhostUserError(.semantics, request, field: field, "[0x\(String(addr, radix: 16)), +\(len)) is not inside guest memory")
            }
            gpas.append(gpa)
        }
        if a.flags & VringAddress.logFlag != 0 {
            guard table.hostPointer(gpa: a.logGuestAddr, length: 4 + 8 * n + eventIdx) != nil else {
                throw VhostUserError(.semantics, request, field: "log_guest_addr", "0x\(String(a.logGuestAddr, radix: 16)) is not inside guest memory")
            }
        }
        vrings[i].descGPA = gpas[0]
        vrings[i].availGPA = gpas[1]
        vrings[i].usedGPA = gpas[2]
    }

    /// Takes the eventfd of a SET_VRING_KICK/CALL/ERR: it must be an eventfd, and is made
    /// non-blocking so that no daemon thread can block on it.
    func takeEventFD(_ fds: inout ReceivedFDs, request: String, ring i: Int) throws(VhostUserError) -> SharedFD {
        guard let fd = fds.take(0) else { throw VhostUserError(.fds, request, field: "fds", "no fd") }
        do { try EventFD.adoptFrontendFD(fd) } catch {
            throw VhostUserError(.fds, request, field: "fd", "ring \(i): \(error)")
        }
        return SharedFD(fd)
    }

    func withinCap(_ bytes: UInt64) -> Bool { bytes <= config.maxMappedBytes }

    /// The per-session cap, from the sizes the frontend announced, before anything is mapped (a
    /// huge sparse file must not take the daemon's address space even for a moment).
    func checkAnnouncedBytes(_ sizes: [UInt64], request: String) throws(VhostUserError) {
        var total: UInt64 = 0
        for size in sizes {
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow, withinCap(sum) else {
                throw VhostUserError(.semantics, request, field: "memory_size",
                                     "the session would map more than the limit of \(config.maxMappedBytes) bytes of the frontend's files")
            }
            total = sum
        }
    }

    /// The per-session cap on mapped bytes (guest memory plus log), exact after mapping (each
    /// window rounded out to whole pages).
    func checkMappedBytes(_ regions: [MemoryRegion], log: DirtyLog?, request: String) throws(VhostUserError) {
        let total = regions.reduce(UInt64(0)) { $0 + UInt64($1.mappedBytes) } + UInt64(log?.mappedBytes ?? 0)
        guard withinCap(total) else {
            throw VhostUserError(.semantics, request, field: "memory_size",
                                 "the session would map \(total) bytes of the frontend's files, more than the limit of \(config.maxMappedBytes)")
        }
    }

    func installMemory(_ table: GuestMemoryTable) throws(VhostUserError) {
        memory.replace(table)
        logger.info("memory table: \(table.regions.count) region(s), guest RAM ends at 0x\(String(table.guestPhysEnd, radix: 16))")
        for i in vrings.indices {
            guard let a = vrings[i].address else { continue }
            do { try translate(a, ring: i, request: "memory table") } catch {
                logger.warning("ring \(i): addresses no longer translate after the memory table changed: \(error)")
            }
        }
        try hooks?.memoryTableChanged(table)
    }

}
