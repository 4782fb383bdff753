// C macros and constants that Swift cannot import from Glibc. No logic lives here (the one
// exception, the SIGBUS guard, is in CVDPAGuard.h: a signal handler must be written in C).
#ifndef CVDPA_SHIMS_H
#define CVDPA_SHIMS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <signal.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <arpa/inet.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include "CVDPAGuard.h"
#include "CVDPAVhostVdpa.h"
#include "CVDPAVduse.h"

static inline size_t cvdpa_cmsg_space(size_t len) { return CMSG_SPACE(len); }
static inline size_t cvdpa_cmsg_len(size_t len) { return CMSG_LEN(len); }
static inline struct cmsghdr *cvdpa_cmsg_firsthdr(struct msghdr *m) { return CMSG_FIRSTHDR(m); }
static inline struct cmsghdr *cvdpa_cmsg_nxthdr(struct msghdr *m, struct cmsghdr *c) { return CMSG_NXTHDR(m, c); }
static inline unsigned char *cvdpa_cmsg_data(struct cmsghdr *c) { return CMSG_DATA(c); }

static inline int cvdpa_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}
static inline int cvdpa_accept4(int fd, int flags) {
    return (int)syscall(SYS_accept4, fd, (void *)0, (void *)0, flags);
}
/* renameat2 (glibc hides it without _GNU_SOURCE); flags e.g. CVDPA_RENAME_NOREPLACE. */
static inline int cvdpa_renameat2(int olddir, const char *oldpath, int newdir, const char *newpath, unsigned int flags) {
    return (int)syscall(SYS_renameat2, olddir, oldpath, newdir, newpath, flags);
}
static inline void cvdpa_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
/* Attaches `fd` (an open /dev/net/tun) to TAP interface `name` (IFF_TAP|IFF_NO_PI, plus
   IFF_VNET_HDR when `vnet_hdr`: every frame then carries a virtio-net header); the kernel's
   chosen name is copied to `out` (IFNAMSIZ bytes). Returns ioctl's result. */
static inline int cvdpa_tap_attach(int fd, const char *name, char *out, int vnet_hdr) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int r = ioctl(fd, TUNSETIFF, &ifr);
    if (r == 0) memcpy(out, ifr.ifr_name, IFNAMSIZ);
    return r;
}
/* TUNSETVNETHDRSZ: the virtio-net header's size on this TAP (10 or 12). */
static inline int cvdpa_tap_set_vnet_hdr_size(int fd, int size) { return ioctl(fd, TUNSETVNETHDRSZ, &size); }
/* TUNSETOFFLOAD: which offloads the reader takes (TUN_F_CSUM, TUN_F_TSO4, ...). */
static inline int cvdpa_tap_set_offload(int fd, unsigned int flags) { return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags); }
static const unsigned int CVDPA_TUN_F_CSUM = TUN_F_CSUM;
static const unsigned int CVDPA_TUN_F_TSO4 = TUN_F_TSO4;
static const unsigned int CVDPA_TUN_F_TSO6 = TUN_F_TSO6;
static const unsigned int CVDPA_TUN_F_TSO_ECN = TUN_F_TSO_ECN;
static const unsigned int CVDPA_TUN_F_UFO = TUN_F_UFO;
/* A raw packet socket (all ethertypes) bound to interface `ifname`: for tests that watch and
   feed a TAP from the host side. Returns the fd, or -1 with errno. */
static inline int cvdpa_packet_socket(const char *ifname) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -1;
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = (int)if_nametoindex(ifname);
    if (sll.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&sll, sizeof sll) != 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}
/* A packet socket that only sends, bound to interface `ifname`: protocol 0, so it receives
   nothing (it adds no per-frame copy on the interface, as an ETH_P_ALL socket would), and
   PACKET_QDISC_BYPASS, so frames go straight to the driver's xmit. For the benchmark's frame
   generator. Returns the fd, or -1 with errno. */
static inline int cvdpa_packet_tx_socket(const char *ifname) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = (int)if_nametoindex(ifname);
    int one = 1;
    if (sll.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&sll, sizeof sll) != 0
        || setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) != 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}
/* struct mmsghdr and sendmmsg(2), which glibc declares only with _GNU_SOURCE. */
struct cvdpa_mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
static inline int cvdpa_sendmmsg(int fd, struct cvdpa_mmsghdr *msgs, unsigned int count, int flags) {
    return (int)syscall(SYS_sendmmsg, fd, msgs, count, flags);
}
static inline uint64_t cvdpa_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static inline uint64_t cvdpa_thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
/* The filesystem type (statfs f_type) of `fd`, or -1 with errno. */
static inline long long cvdpa_fstatfs_type(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0) return -1;
    return (long long)(unsigned long long)(unsigned int)fs.f_type;
}
static inline int cvdpa_errno(void) { return errno; }
static inline void cvdpa_set_errno(int e) { errno = e; }

static const int CVDPA_MSG_CMSG_CLOEXEC = 0x40000000; /* MSG_CMSG_CLOEXEC, hidden without _GNU_SOURCE */
static const int CVDPA_MSG_CTRUNC = MSG_CTRUNC;
static const int CVDPA_MSG_NOSIGNAL = MSG_NOSIGNAL;
static const int CVDPA_SCM_RIGHTS = SCM_RIGHTS;
static const int CVDPA_EFD_CLOEXEC = EFD_CLOEXEC;
static const int CVDPA_EFD_NONBLOCK = EFD_NONBLOCK;
static const int CVDPA_EFD_SEMAPHORE = EFD_SEMAPHORE;
static const int CVDPA_MFD_CLOEXEC = 0x0001U;
static const int CVDPA_MFD_ALLOW_SEALING = 0x0002U;
static const uint32_t CVDPA_EPOLLIN = EPOLLIN;
static const uint32_t CVDPA_EPOLLOUT = EPOLLOUT;
static const uint32_t CVDPA_EPOLLERR = EPOLLERR;
static const uint32_t CVDPA_EPOLLHUP = EPOLLHUP;
static const uint32_t CVDPA_EPOLLRDHUP = EPOLLRDHUP;
static const int CVDPA_SOCK_CLOEXEC = SOCK_CLOEXEC;
static const int CVDPA_SOCK_STREAM = SOCK_STREAM;
static const int CVDPA_SOCK_DGRAM = SOCK_DGRAM;
static const int CVDPA_SOCK_NONBLOCK = SOCK_NONBLOCK;
static const int CVDPA_MSG_DONTWAIT = MSG_DONTWAIT;
static const unsigned int CVDPA_RENAME_NOREPLACE = 1; /* RENAME_NOREPLACE from linux/fs.h */
static const unsigned int CVDPA_S_ISVTX = S_ISVTX;

#endif
