// The kernel's vhost-vdpa character device (/dev/vhost-vdpa-N): request numbers Swift cannot
// import (they are function-like macros), the structures' layouts as the kernel defines them,
// and one non-variadic ioctl entry point. Definitions newer than the build host's headers are
// spelled out here with the values of the kernel's uAPI (linux/vhost.h, linux/vhost_types.h).
#ifndef CVDPA_VHOST_VDPA_H
#define CVDPA_VHOST_VDPA_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/vhost.h>
#include <linux/vhost_types.h>

#ifndef VHOST_VDPA_RESUME
#define VHOST_VDPA_RESUME _IO(VHOST_VIRTIO, 0x7E)
#endif

static const unsigned long CVDPA_VHOST_GET_FEATURES = VHOST_GET_FEATURES;
static const unsigned long CVDPA_VHOST_SET_FEATURES = VHOST_SET_FEATURES;
static const unsigned long CVDPA_VHOST_SET_OWNER = VHOST_SET_OWNER;
static const unsigned long CVDPA_VHOST_GET_BACKEND_FEATURES = VHOST_GET_BACKEND_FEATURES;
static const unsigned long CVDPA_VHOST_SET_BACKEND_FEATURES = VHOST_SET_BACKEND_FEATURES;
static const unsigned long CVDPA_VHOST_SET_VRING_NUM = VHOST_SET_VRING_NUM;
static const unsigned long CVDPA_VHOST_SET_VRING_ADDR = VHOST_SET_VRING_ADDR;
static const unsigned long CVDPA_VHOST_SET_VRING_BASE = VHOST_SET_VRING_BASE;
static const unsigned long CVDPA_VHOST_GET_VRING_BASE = VHOST_GET_VRING_BASE;
static const unsigned long CVDPA_VHOST_SET_VRING_KICK = VHOST_SET_VRING_KICK;
static const unsigned long CVDPA_VHOST_SET_VRING_CALL = VHOST_SET_VRING_CALL;
static const unsigned long CVDPA_VHOST_VDPA_GET_DEVICE_ID = VHOST_VDPA_GET_DEVICE_ID;
static const unsigned long CVDPA_VHOST_VDPA_GET_STATUS = VHOST_VDPA_GET_STATUS;
static const unsigned long CVDPA_VHOST_VDPA_SET_STATUS = VHOST_VDPA_SET_STATUS;
static const unsigned long CVDPA_VHOST_VDPA_GET_CONFIG = VHOST_VDPA_GET_CONFIG;
static const unsigned long CVDPA_VHOST_VDPA_SET_VRING_ENABLE = VHOST_VDPA_SET_VRING_ENABLE;
static const unsigned long CVDPA_VHOST_VDPA_GET_VRING_NUM = VHOST_VDPA_GET_VRING_NUM;
static const unsigned long CVDPA_VHOST_VDPA_GET_IOVA_RANGE = VHOST_VDPA_GET_IOVA_RANGE;
static const unsigned long CVDPA_VHOST_VDPA_GET_CONFIG_SIZE = VHOST_VDPA_GET_CONFIG_SIZE;
static const unsigned long CVDPA_VHOST_VDPA_GET_VQS_COUNT = VHOST_VDPA_GET_VQS_COUNT;
static const unsigned long CVDPA_VHOST_VDPA_SUSPEND = VHOST_VDPA_SUSPEND;
static const unsigned long CVDPA_VHOST_VDPA_RESUME = VHOST_VDPA_RESUME;

/// Backend feature bits (bit numbers, as VHOST_GET_BACKEND_FEATURES reports them as 1 << n).
static const int CVDPA_VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1;
static const int CVDPA_VHOST_BACKEND_F_IOTLB_BATCH = 0x2;
static const int CVDPA_VHOST_BACKEND_F_IOTLB_ASID = 0x3;
static const int CVDPA_VHOST_BACKEND_F_SUSPEND = 0x4;
static const int CVDPA_VHOST_BACKEND_F_RESUME = 0x5;
static const int CVDPA_VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6;
static const int CVDPA_VHOST_BACKEND_F_DESC_ASID = 0x7;
static const int CVDPA_VHOST_BACKEND_F_IOTLB_PERSIST = 0x8;

static const uint32_t CVDPA_VHOST_IOTLB_MSG_V2 = VHOST_IOTLB_MSG_V2;
static const uint8_t CVDPA_VHOST_IOTLB_UPDATE = VHOST_IOTLB_UPDATE;
static const uint8_t CVDPA_VHOST_IOTLB_INVALIDATE = VHOST_IOTLB_INVALIDATE;
static const uint8_t CVDPA_VHOST_IOTLB_BATCH_BEGIN = VHOST_IOTLB_BATCH_BEGIN;
static const uint8_t CVDPA_VHOST_IOTLB_BATCH_END = VHOST_IOTLB_BATCH_END;
static const uint8_t CVDPA_VHOST_ACCESS_RO = VHOST_ACCESS_RO;
static const uint8_t CVDPA_VHOST_ACCESS_RW = VHOST_ACCESS_RW;

/// ioctl is variadic, which Swift cannot call: every vhost-vdpa request passes one pointer.
static inline int cvdpa_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static inline int cvdpa_ioctl_none(int fd, unsigned long request) { return ioctl(fd, request, 0); }

#endif
