import CVDPAShims
import Platform

/// Why a netlink request failed: which request, and what the kernel said.
public struct NetlinkError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    /// The kernel's errno (0 when the failure was not the kernel's answer).
    public let errno: Int32
    public init(_ message: String, errno: Int32 = 0) { self.message = message; self.errno = errno }
    public var description: String { message }
}

/// Generic netlink messages as the kernel lays them out (linux/netlink.h, linux/genetlink.h): a
/// 16-byte nlmsghdr (length, type, flags, sequence, port), a 4-byte genlmsghdr (command, version,
/// reserved), then attributes, each an nlattr (2-byte length counting its 4-byte header but not
/// the padding, 2-byte type) and a payload padded to 4 bytes. Host byte order: netlink never
/// leaves the machine. Pure, so tests pin the bytes (GenericNetlinkTests).
public enum GenericNetlink {
    public static let headerSize = 16
    public static let genericHeaderSize = 4
    public static let attributeHeaderSize = 4
    public static let flagRequest: UInt16 = 0x1
    public static let flagAck: UInt16 = 0x4
    /// Set on an NLMSG_ERROR that carries extended-ack attributes.
    public static let flagAckTLVs: UInt16 = 0x200
    public static let typeError: UInt16 = 2
    public static let typeDone: UInt16 = 3
    /// GENL_ID_CTRL: the controller family, which resolves family names.
    public static let controllerFamily: UInt16 = 0x10
    public static let controllerGetFamily: UInt8 = 3
    public static let controllerAttributeFamilyID: UInt16 = 1
    public static let controllerAttributeFamilyName: UInt16 = 2
    /// NLMSGERR_ATTR_MSG: the kernel's text for an error.
    public static let errorAttributeMessage: UInt16 = 1

    public struct Attribute: Equatable, Sendable {
        public var type: UInt16
        public var payload: [UInt8]
        public init(type: UInt16, payload: [UInt8]) { self.type = type; self.payload = payload }
        /// A NUL-terminated string (what the kernel's nla_data + strcmp users need).
        public static func string(_ type: UInt16, _ value: String) -> Attribute {
            Attribute(type: type, payload: Array(value.utf8) + [0])
        }
    }

    /// One request message: header, generic header, attributes.
    public static func request(family: UInt16, flags: UInt16, sequence: UInt32, command: UInt8, version: UInt8,
                               attributes: [Attribute]) -> [UInt8] {
        var body: [UInt8] = [command, version, 0, 0]
        for a in attributes {
            appendLE(&body, UInt16(attributeHeaderSize + a.payload.count))
            appendLE(&body, a.type)
            body += a.payload
            body += [UInt8](repeating: 0, count: padding(a.payload.count))
        }
        var out: [UInt8] = []
        out.reserveCapacity(headerSize + body.count)
        appendLE(&out, UInt32(headerSize + body.count))
        appendLE(&out, family)
        appendLE(&out, flags)
        appendLE(&out, sequence)
        appendLE(&out, UInt32(0))  // port id: 0, the kernel fills in the sender's
        return out + body
    }

    /// A received message: its header fields and what follows the header.
    public struct Message: Equatable, Sendable {
        public var type: UInt16
        public var flags: UInt16
        public var sequence: UInt32
        public var payload: [UInt8]
    }

    /// Splits a datagram into its messages, each checked to lie inside it.
    public static func messages(in datagram: [UInt8]) throws(NetlinkError) -> [Message] {
        var out: [Message] = []
        var at = 0
        while datagram.count - at >= headerSize {
            let length = Int(readLE(datagram, at, as: UInt32.self))
            guard length >= headerSize, length <= datagram.count - at else {
                throw NetlinkError("netlink reply: a message of \(length) bytes at offset \(at) of a \(datagram.count)-byte datagram")
            }
            out.append(Message(type: readLE(datagram, at + 4, as: UInt16.self), flags: readLE(datagram, at + 6, as: UInt16.self),
                               sequence: readLE(datagram, at + 8, as: UInt32.self),
                               payload: Array(datagram[(at + headerSize)..<(at + length)])))
            at += length + padding(length)
        }
        return out
    }

    /// The attributes in `bytes` by type (the last one wins); stops at the first malformed one.
    public static func attributes(_ bytes: ArraySlice<UInt8>) -> [UInt16: [UInt8]] {
        var out: [UInt16: [UInt8]] = [:]
        var at = bytes.startIndex
        while bytes.endIndex - at >= attributeHeaderSize {
            let length = Int(readLE(bytes, at, as: UInt16.self))
            let type = readLE(bytes, at + 2, as: UInt16.self) & 0x3fff  // without NLA_F_NESTED, NLA_F_NET_BYTEORDER
            guard length >= attributeHeaderSize, length <= bytes.endIndex - at else { break }
            out[type] = Array(bytes[(at + attributeHeaderSize)..<(at + length)])
            at += length + padding(length)
        }
        return out
    }

    /// An NLMSG_ERROR's errno (0: an acknowledgement) and the kernel's text, if it gave one. The
    /// payload is struct nlmsgerr (the error, then the request's 16-byte header: the request
    /// itself is left out, NETLINK_CAP_ACK), then extended-ack attributes when flagged.
    public static func error(in m: Message) -> (errno: Int32, text: String?) {
        guard m.payload.count >= 4 else { return (0, nil) }
        let code = Int32(bitPattern: readLE(m.payload, 0, as: UInt32.self))
        var text: String?
        if m.flags & flagAckTLVs != 0, m.payload.count > 4 + headerSize,
           let t = attributes(m.payload[(4 + headerSize)...])[errorAttributeMessage] {
            text = String(decoding: t.prefix { $0 != 0 }, as: UTF8.self)
        }
        return (-code, text)
    }

    static func padding(_ n: Int) -> Int { (4 - n % 4) % 4 }

    static func appendLE<T: FixedWidthInteger>(_ out: inout [UInt8], _ v: T) {
        withUnsafeBytes(of: v.littleEndian) { out += $0 }
    }

    static func readLE<T: FixedWidthInteger, C: RandomAccessCollection<UInt8>>(_ bytes: C, _ offset: C.Index, as: T.Type) -> T
        where C.Index == Int {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(bytes[offset + i]) << (8 * i) }
        return v
    }
}

/// The vDPA bus's management requests (linux/vdpa.h): what `vdpa dev add name NAME mgmtdev vduse`
/// and `vdpa dev del NAME` send.
public enum VDPANetlink {
    public static let familyName = "vdpa"
    public static let version: UInt8 = 1
    public static let commandDeviceNew: UInt8 = 3
    public static let commandDeviceDelete: UInt8 = 4
    public static let attributeManagementDeviceName: UInt16 = 2
    public static let attributeDeviceName: UInt16 = 4
    /// VDUSE's management device (no bus name: it is not on a bus).
    public static let vduseManagementDevice = "vduse"

    /// CTRL_CMD_GETFAMILY for `name`.
    public static func familyRequest(name: String, sequence: UInt32) -> [UInt8] {
        GenericNetlink.request(family: GenericNetlink.controllerFamily, flags: GenericNetlink.flagRequest | GenericNetlink.flagAck,
                               sequence: sequence, command: GenericNetlink.controllerGetFamily, version: 1,
                               attributes: [.string(GenericNetlink.controllerAttributeFamilyName, name)])
    }

    /// VDPA_CMD_DEV_NEW: adds device `name` of management device `managementDevice` to the bus.
    public static func addDeviceRequest(family: UInt16, name: String, managementDevice: String = vduseManagementDevice,
                                        sequence: UInt32) -> [UInt8] {
        GenericNetlink.request(family: family, flags: GenericNetlink.flagRequest | GenericNetlink.flagAck, sequence: sequence,
                               command: commandDeviceNew, version: version,
                               attributes: [.string(attributeManagementDeviceName, managementDevice), .string(attributeDeviceName, name)])
    }

    /// VDPA_CMD_DEV_DEL: removes device `name` from the bus.
    public static func deleteDeviceRequest(family: UInt16, name: String, sequence: UInt32) -> [UInt8] {
        GenericNetlink.request(family: family, flags: GenericNetlink.flagRequest | GenericNetlink.flagAck, sequence: sequence,
                               command: commandDeviceDelete, version: version, attributes: [.string(attributeDeviceName, name)])
    }
}

/// A generic netlink conversation with the kernel: family lookup, then requests that each wait
/// for their acknowledgement. Used by one thread at a time.
public final class GenericNetlinkClient {
    private let socket: NetlinkSocket
    private var sequence: UInt32 = 1
    /// How long a reply may take. (The kernel handles a request while sending it, so `send`
    /// itself returns only when, say, a new vDPA device's driver has probed it.)
    public let timeoutSeconds: Double

    public init(timeoutSeconds: Double = 10) throws(NetlinkError) {
        do { socket = try NetlinkSocket(protocolFamily: Int32(CVDPA_NETLINK_GENERIC)) } catch {
            throw NetlinkError("cannot open a generic netlink socket: \(error)", errno: error.errno)
        }
        self.timeoutSeconds = timeoutSeconds
    }

    /// The id of generic netlink family `name`.
    public func family(_ name: String, purpose: String) throws(NetlinkError) -> UInt16 {
        let seq = nextSequence()
        let replies = try transact(VDPANetlink.familyRequest(name: name, sequence: seq), sequence: seq) { code, text in
            code == 2  // ENOENT
                ? "the kernel has no generic netlink family '\(name)' (\(purpose): is its module loaded?)"
                : "looking up generic netlink family '\(name)': \(Self.describe(code, text))"
        }
        for m in replies where m.type == GenericNetlink.controllerFamily && m.payload.count >= GenericNetlink.genericHeaderSize {
            let attrs = GenericNetlink.attributes(m.payload[GenericNetlink.genericHeaderSize...])
            if let id = attrs[GenericNetlink.controllerAttributeFamilyID], id.count >= 2 {
                return UInt16(id[0]) | UInt16(id[1]) << 8
            }
        }
        throw NetlinkError("looking up generic netlink family '\(name)': the reply has no family id")
    }

    /// Sends `message` (built with `sequence`) and waits for its acknowledgement; returns the
    /// replies that came before it. A refusal throws what `describe` makes of the errno and the
    /// kernel's text.
    @discardableResult
    public func transact(_ message: [UInt8], sequence seq: UInt32,
                         describe: (Int32, String?) -> String) throws(NetlinkError) -> [GenericNetlink.Message] {
        do { try socket.send(message) } catch { throw NetlinkError(describe(error.errno, nil), errno: error.errno) }
        let deadline = Deadline(secondsFromNow: timeoutSeconds)
        var replies: [GenericNetlink.Message] = []
        while true {
            let datagram: [UInt8]?
            do { datagram = try socket.receive(until: deadline) } catch {
                throw NetlinkError("\(describe(error.errno, nil)) (receiving the reply)", errno: error.errno)
            }
            guard let datagram else { throw NetlinkError("\(describe(0, "no reply within \(timeoutSeconds) s"))") }
            for m in try GenericNetlink.messages(in: datagram) where m.sequence == seq {
                if m.type == GenericNetlink.typeError {
                    let (code, text) = GenericNetlink.error(in: m)
                    if code == 0 { return replies }
                    throw NetlinkError(describe(code, text), errno: code)
                }
                replies.append(m)
            }
        }
    }

    public func nextSequence() -> UInt32 {
        sequence &+= 1
        return sequence
    }

    /// "Invalid argument (errno 22); the kernel says: ..." for messages.
    public static func describe(_ code: Int32, _ text: String?) -> String {
        var s = code == 0 ? "failed" : "\(Errno(rawValue: code)) (errno \(code))"
        if let text, !text.isEmpty { s += "; the kernel says: \(text)" }
        return s
    }
}
