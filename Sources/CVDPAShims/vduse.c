// VDUSE_CREATE_DEV's argument (see CVDPAVduse.h): a struct ending in a flexible array, built here
// because Swift cannot lay one out.
#include "CVDPAVduse.h"
#include <errno.h>
#include <stdlib.h>

int cvdpa_vduse_create_dev(int fd, const char *name, uint32_t vendor_id, uint32_t device_id, uint64_t features,
                           uint32_t vq_num, uint32_t vq_align, const void *config, uint32_t config_size) {
    size_t header = offsetof(struct vduse_dev_config, config);
    struct vduse_dev_config *c = calloc(1, header + config_size);
    if (c == NULL) { errno = ENOMEM; return -1; }
    strncpy(c->name, name, VDUSE_NAME_MAX - 1);
    c->vendor_id = vendor_id;
    c->device_id = device_id;
    c->features = features;
    c->vq_num = vq_num;
    c->vq_align = vq_align;
    c->config_size = config_size;
    if (config_size > 0) memcpy(c->config, config, config_size);
    int r = ioctl(fd, VDUSE_CREATE_DEV, c);
    int saved = errno;
    free(c);
    errno = saved;
    return r;
}
