// VDUSE (linux/vduse.h) and generic netlink (linux/netlink.h, genetlink.h, vdpa.h) as Swift
// needs them: the ioctl numbers are _IOW/_IOR macros and the structs hold anonymous unions and a
// flexible array, none of which Swift imports, so each ioctl gets a wrapper taking plain fields.
// No logic lives here (the one buffer-building function is in vduse.c).
#ifndef CVDPA_VDUSE_H
#define CVDPA_VDUSE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/vduse.h>
#include <linux/vdpa.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>

// MARK: /dev/vduse/control

static const uint64_t CVDPA_VDUSE_API_VERSION = VDUSE_API_VERSION;
static const int CVDPA_VDUSE_NAME_MAX = VDUSE_NAME_MAX;

static inline int cvdpa_vduse_get_api_version(int fd, uint64_t *version) {
    return ioctl(fd, VDUSE_GET_API_VERSION, version);
}
static inline int cvdpa_vduse_set_api_version(int fd, uint64_t version) {
    return ioctl(fd, VDUSE_SET_API_VERSION, &version);
}
/* VDUSE_CREATE_DEV with a vduse_dev_config followed by `config_size` bytes of config space
   (vduse.c: the struct ends in a flexible array). `name` must be shorter than VDUSE_NAME_MAX.
   Returns ioctl's result (-1 with errno; ENOMEM if the buffer could not be allocated). */
int cvdpa_vduse_create_dev(int fd, const char *name, uint32_t vendor_id, uint32_t device_id, uint64_t features,
                           uint32_t vq_num, uint32_t vq_align, const void *config, uint32_t config_size);
static inline int cvdpa_vduse_destroy_dev(int fd, const char *name) {
    char buf[VDUSE_NAME_MAX];
    memset(buf, 0, sizeof buf);
    strncpy(buf, name, sizeof buf - 1);
    return ioctl(fd, VDUSE_DESTROY_DEV, buf);
}

// MARK: /dev/vduse/NAME

static inline int cvdpa_vduse_vq_setup(int fd, uint32_t index, uint16_t max_size) {
    struct vduse_vq_config c;
    memset(&c, 0, sizeof c);
    c.index = index;
    c.max_size = max_size;
    return ioctl(fd, VDUSE_VQ_SETUP, &c);
}
static inline int cvdpa_vduse_get_features(int fd, uint64_t *features) {
    return ioctl(fd, VDUSE_DEV_GET_FEATURES, features);
}
/* VDUSE_VQ_GET_INFO for a split ring: size, the three areas' IOVAs, the avail index the driver
   set (set_vq_state), and whether the driver made it ready. */
static inline int cvdpa_vduse_vq_get_info(int fd, uint32_t index, uint32_t *num, uint64_t *desc, uint64_t *driver,
                                          uint64_t *device, uint16_t *avail_index, uint8_t *ready) {
    struct vduse_vq_info info;
    memset(&info, 0, sizeof info);
    info.index = index;
    int r = ioctl(fd, VDUSE_VQ_GET_INFO, &info);
    if (r != 0) return r;
    *num = info.num;
    *desc = info.desc_addr;
    *driver = info.driver_addr;
    *device = info.device_addr;
    *avail_index = info.split.avail_index;
    *ready = info.ready;
    return 0;
}
static inline int cvdpa_vduse_vq_setup_kickfd(int fd, uint32_t index, int eventfd) {
    struct vduse_vq_eventfd e;
    memset(&e, 0, sizeof e);
    e.index = index;
    e.fd = eventfd;
    return ioctl(fd, VDUSE_VQ_SETUP_KICKFD, &e);
}
static inline int cvdpa_vduse_vq_inject_irq(int fd, uint32_t index) {
    return ioctl(fd, VDUSE_VQ_INJECT_IRQ, &index);
}
/* VDUSE_IOTLB_GET_FD: the first IOTLB entry overlapping [*start, *last]. On success returns a new
   fd (close-on-exec is not set by the kernel: the caller sets it) and rewrites *start, *last,
   *offset (into that file) and *perm (VDUSE_ACCESS_*); -1 with errno EINVAL when none overlaps. */
static inline int cvdpa_vduse_iotlb_get_fd(int fd, uint64_t *start, uint64_t *last, uint64_t *offset, uint8_t *perm) {
    struct vduse_iotlb_entry e;
    memset(&e, 0, sizeof e);
    e.start = *start;
    e.last = *last;
    int r = ioctl(fd, VDUSE_IOTLB_GET_FD, &e);
    if (r < 0) return r;
    *start = e.start;
    *last = e.last;
    *offset = e.offset;
    *perm = e.perm;
    return r;
}

static const uint8_t CVDPA_VDUSE_ACCESS_RO = VDUSE_ACCESS_RO;
static const uint8_t CVDPA_VDUSE_ACCESS_WO = VDUSE_ACCESS_WO;
static const uint8_t CVDPA_VDUSE_ACCESS_RW = VDUSE_ACCESS_RW;

// The messages read(2) and write(2) carry on /dev/vduse/NAME, for tests that pin the Swift
// codec's offsets to the kernel's layout.
static const uint32_t CVDPA_VDUSE_GET_VQ_STATE = VDUSE_GET_VQ_STATE;
static const uint32_t CVDPA_VDUSE_SET_STATUS = VDUSE_SET_STATUS;
static const uint32_t CVDPA_VDUSE_UPDATE_IOTLB = VDUSE_UPDATE_IOTLB;
static const uint32_t CVDPA_VDUSE_REQ_RESULT_OK = VDUSE_REQ_RESULT_OK;
static const uint32_t CVDPA_VDUSE_REQ_RESULT_FAILED = VDUSE_REQ_RESULT_FAILED;
static const size_t CVDPA_VDUSE_REQUEST_SIZE = sizeof(struct vduse_dev_request);
static const size_t CVDPA_VDUSE_RESPONSE_SIZE = sizeof(struct vduse_dev_response);
static const size_t CVDPA_VDUSE_REQ_OFF_TYPE = offsetof(struct vduse_dev_request, type);
static const size_t CVDPA_VDUSE_REQ_OFF_ID = offsetof(struct vduse_dev_request, request_id);
static const size_t CVDPA_VDUSE_REQ_OFF_VQ_INDEX = offsetof(struct vduse_dev_request, vq_state.index);
static const size_t CVDPA_VDUSE_REQ_OFF_STATUS = offsetof(struct vduse_dev_request, s.status);
static const size_t CVDPA_VDUSE_REQ_OFF_IOVA_START = offsetof(struct vduse_dev_request, iova.start);
static const size_t CVDPA_VDUSE_REQ_OFF_IOVA_LAST = offsetof(struct vduse_dev_request, iova.last);
static const size_t CVDPA_VDUSE_RESP_OFF_ID = offsetof(struct vduse_dev_response, request_id);
static const size_t CVDPA_VDUSE_RESP_OFF_RESULT = offsetof(struct vduse_dev_response, result);
static const size_t CVDPA_VDUSE_RESP_OFF_RESERVED = offsetof(struct vduse_dev_response, reserved);
static const size_t CVDPA_VDUSE_RESP_OFF_VQ_INDEX = offsetof(struct vduse_dev_response, vq_state.index);
static const size_t CVDPA_VDUSE_RESP_OFF_AVAIL_INDEX = offsetof(struct vduse_dev_response, vq_state.split.avail_index);
static const size_t CVDPA_VDUSE_CONFIG_HEADER_SIZE = offsetof(struct vduse_dev_config, config);

// MARK: generic netlink (the vdpa family: what `vdpa dev add` sends)

static const int CVDPA_AF_NETLINK = AF_NETLINK;
static const int CVDPA_NETLINK_GENERIC = NETLINK_GENERIC;
static const int CVDPA_SOL_NETLINK = 270; /* SOL_NETLINK, in sys/socket.h only with _GNU_SOURCE */
static const int CVDPA_NETLINK_CAP_ACK = NETLINK_CAP_ACK;
static const int CVDPA_NETLINK_EXT_ACK = NETLINK_EXT_ACK;
static const uint16_t CVDPA_NLM_F_REQUEST = NLM_F_REQUEST;
static const uint16_t CVDPA_NLM_F_ACK = NLM_F_ACK;
static const uint16_t CVDPA_NLM_F_ACK_TLVS = NLM_F_ACK_TLVS;
static const uint16_t CVDPA_NLMSG_ERROR = NLMSG_ERROR;
static const uint16_t CVDPA_NLMSG_DONE = NLMSG_DONE;
static const uint16_t CVDPA_NLMSGERR_ATTR_MSG = NLMSGERR_ATTR_MSG;
static const uint16_t CVDPA_GENL_ID_CTRL = GENL_ID_CTRL;
static const uint8_t CVDPA_CTRL_CMD_GETFAMILY = CTRL_CMD_GETFAMILY;
static const uint16_t CVDPA_CTRL_ATTR_FAMILY_ID = CTRL_ATTR_FAMILY_ID;
static const uint16_t CVDPA_CTRL_ATTR_FAMILY_NAME = CTRL_ATTR_FAMILY_NAME;
static const size_t CVDPA_NLMSGHDR_SIZE = sizeof(struct nlmsghdr);
static const size_t CVDPA_GENLMSGHDR_SIZE = sizeof(struct genlmsghdr);
static const size_t CVDPA_NLATTR_SIZE = sizeof(struct nlattr);
static const uint8_t CVDPA_VDPA_GENL_VERSION = VDPA_GENL_VERSION;
static const uint8_t CVDPA_VDPA_CMD_DEV_NEW = VDPA_CMD_DEV_NEW;
static const uint8_t CVDPA_VDPA_CMD_DEV_DEL = VDPA_CMD_DEV_DEL;
static const uint16_t CVDPA_VDPA_ATTR_MGMTDEV_DEV_NAME = VDPA_ATTR_MGMTDEV_DEV_NAME;
static const uint16_t CVDPA_VDPA_ATTR_DEV_NAME = VDPA_ATTR_DEV_NAME;

#endif
