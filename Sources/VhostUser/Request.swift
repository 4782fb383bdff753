
/// vhost-user front-end requests (QEMU docs/interop/vhost-user.rst, "Front-end message types").
public enum VhostUserRequest: UInt32, Sendable, CaseIterable {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMsg = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case createCryptoSession = 26
    case closeCryptoSession = 27
    case postcopyAdvise = 28
    case postcopyListen = 29
    case postcopyEnd = 30
    case getInflightFD = 31
    case setInflightFD = 32
    case gpuSetSocket = 33
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40

    /// The spec's name, for logs and errors.
    public var name: String {
        switch self {
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .sendRARP: "SEND_RARP"
        case .netSetMTU: "NET_SET_MTU"
        case .setBackendReqFD: "SET_BACKEND_REQ_FD"
        case .iotlbMsg: "IOTLB_MSG"
        case .setVringEndian: "SET_VRING_ENDIAN"
        case .getConfig: "GET_CONFIG"
        case .setConfig: "SET_CONFIG"
        case .createCryptoSession: "CREATE_CRYPTO_SESSION"
        case .closeCryptoSession: "CLOSE_CRYPTO_SESSION"
        case .postcopyAdvise: "POSTCOPY_ADVISE"
        case .postcopyListen: "POSTCOPY_LISTEN"
        case .postcopyEnd: "POSTCOPY_END"
        case .getInflightFD: "GET_INFLIGHT_FD"
        case .setInflightFD: "SET_INFLIGHT_FD"
        case .gpuSetSocket: "GPU_SET_SOCKET"
        case .resetDevice: "RESET_DEVICE"
        case .vringKick: "VRING_KICK"
        case .getMaxMemSlots: "GET_MAX_MEM_SLOTS"
        case .addMemReg: "ADD_MEM_REG"
        case .remMemReg: "REM_MEM_REG"
        case .setStatus: "SET_STATUS"
        case .getStatus: "GET_STATUS"
        }
    }

    /// Requests whose reply is part of the protocol (sent whether or not need_reply is set).
    public var hasReply: Bool {
        switch self {
        case .getFeatures, .getProtocolFeatures, .getVringBase, .getQueueNum, .getMaxMemSlots,
             .getStatus, .setLogBase, .getConfig, .getInflightFD, .postcopyAdvise, .createCryptoSession:
            true
        default:
            false
        }
    }

    /// The protocol feature that must have been negotiated before this request may be sent.
    public var requiredProtocolFeature: UInt64? {
        switch self {
        case .getQueueNum: VhostUserProtocolFeature.mq
        case .setLogBase: VhostUserProtocolFeature.logShmfd
        case .sendRARP: VhostUserProtocolFeature.rarp
        case .netSetMTU: VhostUserProtocolFeature.netMTU
        case .setBackendReqFD: VhostUserProtocolFeature.backendReq
        case .iotlbMsg: nil
        case .setVringEndian: VhostUserProtocolFeature.crossEndian
        case .getConfig, .setConfig: VhostUserProtocolFeature.config
        case .createCryptoSession, .closeCryptoSession: VhostUserProtocolFeature.cryptoSession
        case .postcopyAdvise, .postcopyListen, .postcopyEnd: VhostUserProtocolFeature.pagefault
        case .getInflightFD, .setInflightFD: VhostUserProtocolFeature.inflightShmfd
        case .resetDevice: VhostUserProtocolFeature.resetDevice
        case .vringKick: VhostUserProtocolFeature.inbandNotifications
        case .getMaxMemSlots, .addMemReg, .remMemReg: VhostUserProtocolFeature.configureMemSlots
        case .setStatus, .getStatus: VhostUserProtocolFeature.status
        default: nil
        }
    }
}

/// vhost-user protocol feature bits.
public enum VhostUserProtocolFeature {
    public static let mq: UInt64 = 1 << 0
    public static let logShmfd: UInt64 = 1 << 1
    public static let rarp: UInt64 = 1 << 2
    public static let replyAck: UInt64 = 1 << 3
    public static let netMTU: UInt64 = 1 << 4
    public static let backendReq: UInt64 = 1 << 5
    public static let crossEndian: UInt64 = 1 << 6
    public static let cryptoSession: UInt64 = 1 << 7
    public static let pagefault: UInt64 = 1 << 8
    public static let config: UInt64 = 1 << 9
    public static let backendSendFD: UInt64 = 1 << 10
    public static let hostNotifier: UInt64 = 1 << 11
    public static let inflightShmfd: UInt64 = 1 << 12
    public static let resetDevice: UInt64 = 1 << 13
    public static let inbandNotifications: UInt64 = 1 << 14
    public static let configureMemSlots: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16

    public static func describe(_ bits: UInt64) -> String {
        let names: [(UInt64, String)] = [
            (mq, "MQ"), (logShmfd, "LOG_SHMFD"), (rarp, "RARP"), (replyAck, "REPLY_ACK"), (netMTU, "NET_MTU"),
            (backendReq, "BACKEND_REQ"), (crossEndian, "CROSS_ENDIAN"), (cryptoSession, "CRYPTO_SESSION"),
            (pagefault, "PAGEFAULT"), (config, "CONFIG"), (backendSendFD, "BACKEND_SEND_FD"),
            (hostNotifier, "HOST_NOTIFIER"), (inflightShmfd, "INFLIGHT_SHMFD"), (resetDevice, "RESET_DEVICE"),
            (inbandNotifications, "INBAND_NOTIFICATIONS"), (configureMemSlots, "CONFIGURE_MEM_SLOTS"),
            (status, "STATUS"),
        ]
        var out: [String] = []
        var rest = bits
        for (bit, name) in names where bits & bit != 0 { out.append(name); rest &= ~bit }
        if rest != 0 { out.append("0x" + String(rest, radix: 16)) }
        return out.joined(separator: "|")
    }
}
