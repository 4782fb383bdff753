// libFuzzer target for the vhost-user message decoder (header and body layers).
// Built by scripts/fuzz together with the codec's source files; never part of the package build.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 1 else { return 0 }
    // First byte: how many fds the message "carried" (0...15); the rest is the wire bytes,
    // possibly several messages back to back.
    let fdCount = Int(data[0] & 0x0f)
    var raw = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    while raw.count >= VhostUserHeader.size {
        let decoded: (VhostUserRequest, VhostUserHeader)
        do { decoded = try VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<VhostUserHeader.size])) } catch {
            return 0
        }
        let (request, header) = decoded
        let bodyEnd = VhostUserHeader.size + Int(header.size)
        guard bodyEnd <= raw.count else { return 0 }
        let body = UnsafeRawBufferPointer(rebasing: raw[VhostUserHeader.size..<bodyEnd])
        if let payload = try? VhostUserCodec.decodeBody(request, header: header, body: body, fdCount: fdCount) {
            // Re-encoding a decoded request must reproduce a decodable message of the same kind.
            let again = VhostUserCodec.encodeRequest(request, needReply: header.needReply, payload: payload)
            again.withUnsafeBytes { bytes in
                guard let (r2, h2) = try? VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: bytes[0..<12])) else {
                    fatalError("re-encoded header does not decode")
                }
                precondition(r2 == request && h2.needReply == header.needReply)
                let p2 = try? VhostUserCodec.decodeBody(r2, header: h2, body: UnsafeRawBufferPointer(rebasing: bytes[12...]), fdCount: fdCount)
                precondition(p2 == payload, "round trip changed the payload of \(request.name)")
            }
        }
        raw = UnsafeRawBufferPointer(rebasing: raw[bodyEnd...])
    }
    return 0
}
