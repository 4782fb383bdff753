/// The pure vhost-user message decoder: header, then body size and fd count per request.
/// It never touches fds or memory; the session applies feature and semantic checks after it.
public enum VhostUserCodec {
    /// Most regions one SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS).
    public static let maxMemTableRegions = 8
    public static let vringNoFDFlag: UInt64 = 1 << 8
    public static let vringIndexMask: UInt64 = 0xff

    /// Layer 1: the header. Checks version, reserved flag bits, size limit and the request number.
    public static func decodeHeader(_ raw: UnsafeRawBufferPointer) throws(VhostUserError) -> (VhostUserRequest, VhostUserHeader) {
        guard raw.count >= VhostUserHeader.size else {
            throw VhostUserError(.header, "header", field: "length", "\(raw.count) bytes, need \(VhostUserHeader.size)")
        }
        let r = LEReader(bytes: raw)
        let header = VhostUserHeader(request: r.u32(0), flags: r.u32(4), size: r.u32(8))
        guard let request = VhostUserRequest(rawValue: header.request) else {
            throw VhostUserError(.header, "request \(header.request)", field: "request", "unknown request number \(header.request)")
        }
        guard header.flags & VhostUserHeader.versionMask == VhostUserHeader.version else {
            throw VhostUserError(.header, request.name, field: "flags.version", "version \(header.flags & VhostUserHeader.versionMask), expected 1")
        }
        guard header.flags & VhostUserHeader.replyFlag == 0 else {
            throw VhostUserError(.header, request.name, field: "flags.reply", "reply bit set on a request")
        }
        let reserved = header.flags & ~(VhostUserHeader.versionMask | VhostUserHeader.needReplyFlag)
        guard reserved == 0 else {
            throw VhostUserError(.header, request.name, field: "flags", "reserved bits 0x\(String(reserved, radix: 16)) set")
        }
        guard header.size <= UInt32(VhostUserHeader.maxPayload) else {
            throw VhostUserError(.header, request.name, field: "size", "\(header.size) bytes exceeds the \(VhostUserHeader.maxPayload)-byte limit")
        }
        return (request, header)
    }

    /// Layers 2 and 3: the body size for this request and the number of fds that came with it.
    public static func decodeBody(_ request: VhostUserRequest, header: VhostUserHeader,
                                  body: UnsafeRawBufferPointer, fdCount: Int) throws(VhostUserError) -> VhostUserPayload {
        let name = request.name
        let size = body.count
        let r = LEReader(bytes: body)

        func expectSize(_ allowed: Int...) throws(VhostUserError) {
            guard allowed.contains(size) else {
                let want = allowed.map(String.init).joined(separator: " or ")
                throw VhostUserError(.body, name, field: "size", "\(size) bytes, expected \(want)")
            }
        }
        func expectFDs(_ allowed: ClosedRange<Int>) throws(VhostUserError) {
            guard allowed.contains(fdCount) else {
                let want = allowed.lowerBound == allowed.upperBound ? "\(allowed.lowerBound)" : "\(allowed.lowerBound)...\(allowed.upperBound)"
                throw VhostUserError(.fds, name, field: "fds", "\(fdCount) fds, expected \(want)")
            }
        }
        func region(at o: Int) -> MemoryRegionDescription {
            MemoryRegionDescription(guestPhysAddr: r.u64(o), size: r.u64(o + 8), userAddr: r.u64(o + 16), mmapOffset: r.u64(o + 24))
        }

        switch request {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getMaxMemSlots, .getStatus:
            // QEMU sends these with no body; some frontends send a zero u64. Both are accepted.
            try expectSize(0, 8)
            try expectFDs(0...0)
            return .none
        case .setOwner, .resetOwner, .resetDevice:
            try expectSize(0)
            try expectFDs(0...0)
            return .none
        case .setFeatures, .setProtocolFeatures, .sendRARP, .netSetMTU, .setStatus:
            try expectSize(8)
            try expectFDs(0...0)
            return .u64(r.u64(0))
        case .setVringNum, .setVringBase, .getVringBase, .setVringEnable:
            try expectSize(8)
            try expectFDs(0...0)
            return .vringState(VringState(index: r.u32(0), num: r.u32(4)))
        case .setVringAddr:
            try expectSize(40)
            try expectFDs(0...0)
            return .vringAddress(VringAddress(index: r.u32(0), flags: r.u32(4), descUserAddr: r.u64(8),
                                              usedUserAddr: r.u64(16), availUserAddr: r.u64(24), logGuestAddr: r.u64(32)))
        case .setVringKick, .setVringCall, .setVringErr:
            try expectSize(8)
            let v = r.u64(0)
            let noFD = v & vringNoFDFlag != 0
            guard v & ~(vringNoFDFlag | vringIndexMask) == 0 else {
                throw VhostUserError(.body, name, field: "u64", "reserved bits set in 0x\(String(v, radix: 16))")
            }
            try expectFDs(noFD ? 0...0 : 1...1)
            return .vringFile(index: UInt32(v & vringIndexMask), hasFD: !noFD)
        case .setMemTable:
            guard size >= 8 else { throw VhostUserError(.body, name, field: "size", "\(size) bytes, too short for nregions") }
            let n = Int(r.u32(0))
            guard n >= 1, n <= maxMemTableRegions else {
                throw VhostUserError(.body, name, field: "nregions", "\(n), expected 1...\(maxMemTableRegions)")
            }
            try expectSize(8 + 32 * n)
            try expectFDs(n...n)
            return .memoryTable((0..<n).map { region(at: 8 + 32 * $0) })
        case .addMemReg:
            try expectSize(40)
            try expectFDs(1...1)
            return .memoryRegion(region(at: 8))
        case .remMemReg:
            // QEMU sends the region's fd along with REM_MEM_REG; it is accepted and closed.
            try expectSize(40)
            try expectFDs(0...1)
            return .memoryRegion(region(at: 8))
        case .setLogBase:
            try expectSize(16)
            try expectFDs(1...1)
            return .log(LogDescription(size: r.u64(0), offset: r.u64(8)))
        case .setLogFD, .setBackendReqFD:
            try expectSize(0, 8)
            try expectFDs(1...1)
            return .none
        case .iotlbMsg, .setVringEndian, .getConfig, .setConfig, .createCryptoSession, .closeCryptoSession,
             .postcopyAdvise, .postcopyListen, .postcopyEnd, .getInflightFD, .setInflightFD, .gpuSetSocket, .vringKick:
            throw VhostUserError(.features, name, field: "request", "not supported by this backend (its feature was not offered)")
        }
    }

    /// Encodes a reply: header with the reply bit, then the payload.
    public static func encodeReply(_ request: VhostUserRequest, payload: [UInt8]) -> [UInt8] {
        var out = VhostUserHeader(request: request.rawValue, flags: VhostUserHeader.version | VhostUserHeader.replyFlag,
                                  size: UInt32(payload.count)).encode()
        out.append(contentsOf: payload)
        return out
    }

    public static func u64Payload(_ v: UInt64) -> [UInt8] { var a: [UInt8] = []; a.appendLE(v); return a }
    public static func vringStatePayload(_ s: VringState) -> [UInt8] { var a: [UInt8] = []; a.appendLE(s.index); a.appendLE(s.num); return a }
}

// MARK: encoding requests (used by the frontend library and tests)
extension VhostUserCodec {
    /// Encodes a request: header (version 1, optional need_reply) then the payload bytes.
    public static func encodeRequest(_ request: VhostUserRequest, needReply: Bool = false, payload: VhostUserPayload) -> [UInt8] {
        var body: [UInt8] = []
        switch payload {
        case .none: break
        case .u64(let v): body.appendLE(v)
        case .vringState(let s): body.appendLE(s.index); body.appendLE(s.num)
        case .vringAddress(let a):
            body.appendLE(a.index); body.appendLE(a.flags); body.appendLE(a.descUserAddr)
            body.appendLE(a.usedUserAddr); body.appendLE(a.availUserAddr); body.appendLE(a.logGuestAddr)
        case .memoryTable(let regions):
            body.appendLE(UInt32(regions.count)); body.appendLE(UInt32(0))
            for m in regions { appendRegion(&body, m) }
        case .memoryRegion(let m):
            body.appendLE(UInt64(0))
            appendRegion(&body, m)
        case .log(let l): body.appendLE(l.size); body.appendLE(l.offset)
        case .vringFile(let index, let hasFD):
            body.appendLE(UInt64(index) | (hasFD ? 0 : vringNoFDFlag))
        }
        var flags = VhostUserHeader.version
        if needReply { flags |= VhostUserHeader.needReplyFlag }
        var out = VhostUserHeader(request: request.rawValue, flags: flags, size: UInt32(body.count)).encode()
        out.append(contentsOf: body)
        return out
    }

    private static func appendRegion(_ body: inout [UInt8], _ m: MemoryRegionDescription) {
        body.appendLE(m.guestPhysAddr); body.appendLE(m.size); body.appendLE(m.userAddr); body.appendLE(m.mmapOffset)
    }

    /// Decodes a reply header (reply bit required) from the backend.
    public static func decodeReplyHeader(_ raw: UnsafeRawBufferPointer) -> VhostUserHeader? {
        guard raw.count >= VhostUserHeader.size else { return nil }
        let r = LEReader(bytes: raw)
        let h = VhostUserHeader(request: r.u32(0), flags: r.u32(4), size: r.u32(8))
        guard h.flags & VhostUserHeader.replyFlag != 0, h.flags & VhostUserHeader.versionMask == VhostUserHeader.version,
              h.size <= UInt32(VhostUserHeader.maxPayload) else { return nil }
        return h
    }

    public static func readU64(_ raw: UnsafeRawBufferPointer, at offset: Int = 0) -> UInt64 { LEReader(bytes: raw).u64(offset) }
    public static func readU32(_ raw: UnsafeRawBufferPointer, at offset: Int = 0) -> UInt32 { LEReader(bytes: raw).u32(offset) }
}
