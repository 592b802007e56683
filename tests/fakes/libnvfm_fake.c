/*
 * A fake libnvfm.so: Fabric Manager's C API (nv_fm_agent.h) with the simulator's rules, for
 * the HGX H100/H200 8-GPU default partition table. Built by the tests with gcc:
 *
 *     gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o libnvfm_fake.so libnvfm_fake.c
 *
 * State ("FM's state file") lives in the file named by $NVSWITCH_DP_FAKE_NVFM_STATE, so it
 * outlives connections and processes. Text, one "key value" a line:
 *     active <bitmask of active partition IDs>
 *     awaiting <1 while FM waits for fmSetActivatedFabricPartitions after --restart>
 *     down <1 while FM cannot be reached>
 * Tests write "awaiting 1" (FM restarted) or "down 1" (FM gone) into it to inject faults.
 *
 * Rules (shared/reference/fabric-manager.md): activating an active partition or one sharing
 * a GPU with an active one is IN_USE; deactivating an inactive one is UNINITIALIZED; an
 * unknown ID is BADPARAM; while awaiting, list/activate/deactivate are NOT_CONFIGURED; when
 * down, fmConnect and every call are CONNECTION_NOT_VALID. Struct versions are checked as
 * the real library does (VERSION_MISMATCH). The layouts below are copied field for field
 * from nv_fm_types.h; fakeNvfmSizeof() lets the tests compare them with ctypes.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

typedef enum fmReturn_enum {
    FM_ST_SUCCESS = 0,
    FM_ST_BADPARAM = -1,
    FM_ST_GENERIC_ERROR = -2,
    FM_ST_NOT_SUPPORTED = -3,
    FM_ST_UNINITIALIZED = -4,
    FM_ST_TIMEOUT = -5,
    FM_ST_VERSION_MISMATCH = -6,
    FM_ST_IN_USE = -7,
    FM_ST_NOT_CONFIGURED = -8,
    FM_ST_CONNECTION_NOT_VALID = -9,
    FM_ST_NVLINK_ERROR = -10,
} fmReturn_t;

typedef void *fmHandle_t;

#define FM_MAX_STR_LENGTH 256
#define FM_UUID_BUFFER_SIZE 80
#define FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32
#define MAKE_FM_PARAM_VERSION(typeName, ver) (unsigned int)(sizeof(typeName) | ((ver) << 24))
#define FM_MAX_NUM_GPUS 16
#define FM_MAX_FABRIC_PARTITIONS 64

typedef struct {
    unsigned int version;
    char addressInfo[FM_MAX_STR_LENGTH];
    unsigned int timeoutMs;
    unsigned int addressIsUnixSocket;
} fmConnectParams_v1;

enum nvFmApiAddrTypes {
    NV_FM_API_ADDR_TYPE_UNKNOWN = 0,
    NV_FM_API_ADDR_TYPE_INET = 1,
    NV_FM_API_ADDR_TYPE_UNIX = 2,
    NV_FM_API_ADDR_TYPE_VSOCK = 3,
};

typedef struct {
    unsigned int version;
    char addressInfo[FM_MAX_STR_LENGTH];
    unsigned int timeoutMs;
    unsigned int addressIsUnixSocket;
    enum nvFmApiAddrTypes addressType;
} fmConnectParams_v2;

typedef fmConnectParams_v2 fmConnectParams_t;
#define fmConnectParams_v1_version MAKE_FM_PARAM_VERSION(fmConnectParams_v1, 1)
#define fmConnectParams_version MAKE_FM_PARAM_VERSION(fmConnectParams_v2, 2)

typedef unsigned int fmFabricPartitionId_t;

typedef struct {
    unsigned int physicalId;
    char uuid[FM_UUID_BUFFER_SIZE];
    char pciBusId[FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    unsigned int numNvLinksAvailable;
    unsigned int maxNumNvLinks;
    unsigned int nvlinkLineRateMBps;
} fmFabricPartitionGpuInfo_t;

typedef struct {
    fmFabricPartitionId_t partitionId;
    unsigned int isActive;
    unsigned int numGpus;
    fmFabricPartitionGpuInfo_t gpuInfo[FM_MAX_NUM_GPUS];
} fmFabricPartitionInfo_t;

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    unsigned int maxNumPartitions;
    fmFabricPartitionInfo_t partitionInfo[FM_MAX_FABRIC_PARTITIONS];
} fmFabricPartitionList_t;
#define fmFabricPartitionList_version MAKE_FM_PARAM_VERSION(fmFabricPartitionList_t, 1)

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    fmFabricPartitionId_t partitionIds[FM_MAX_FABRIC_PARTITIONS];
} fmActivatedFabricPartitionList_t;
#define fmActivatedFabricPartitionList_version \
    MAKE_FM_PARAM_VERSION(fmActivatedFabricPartitionList_t, 1)

typedef struct {
    fmFabricPartitionId_t partitionId;
    unsigned int numGpus;
    unsigned int gpuPhysicalIds[FM_MAX_NUM_GPUS];
} fmUnsupportedFabricPartitionInfo_t;

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    fmUnsupportedFabricPartitionInfo_t partitionInfo[FM_MAX_FABRIC_PARTITIONS];
} fmUnsupportedFabricPartitionList_t;
#define fmUnsupportedFabricPartitionList_version \
    MAKE_FM_PARAM_VERSION(fmUnsupportedFabricPartitionList_t, 1)

#define API __attribute__((visibility("default")))

/* ---- the HGX H100/H200 8-GPU table (IDs from 0; pairs are not adjacent modules) ---- */

#define NUM_PARTITIONS 15
#define LINE_RATE_MBPS 26562
#define LINKS 18

static const struct {
    unsigned int numGpus;
    unsigned int modules[8];
} TABLE[NUM_PARTITIONS] = {
    {8, {1, 2, 3, 4, 5, 6, 7, 8}},
    {4, {1, 2, 3, 4}}, {4, {5, 6, 7, 8}},
    {2, {1, 3}}, {2, {2, 4}}, {2, {5, 7}}, {2, {6, 8}},
    {1, {1}}, {1, {2}}, {1, {3}}, {1, {4}}, {1, {5}}, {1, {6}}, {1, {7}}, {1, {8}},
};

static unsigned int module_mask(unsigned int pid) {
    unsigned int mask = 0;
    for (unsigned int i = 0; i < TABLE[pid].numGpus; i++)
        mask |= 1u << TABLE[pid].modules[i];
    return mask;
}

/* ---- state file ---- */

typedef struct {
    unsigned long long active;
    int awaiting;
    int down;
} fm_state_t;

static int g_inited = 0;
static char g_last_address[FM_MAX_STR_LENGTH];
static int g_last_address_type = -1;
static unsigned int g_last_connect_version = 0;

typedef struct {
    unsigned int magic;
} fake_handle_t;
#define HANDLE_MAGIC 0xF4B71C0Du

/* Opens and locks the state file; returns the fd (or -1 if the variable is unset). */
static int state_lock(void) {
    const char *path = getenv("NVSWITCH_DP_FAKE_NVFM_STATE");
    if (path == NULL || path[0] == '\0')
        return -1;
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0)
        return -1;
    flock(fd, LOCK_EX);
    return fd;
}

static void state_read(int fd, fm_state_t *st) {
    char buf[512];
    memset(st, 0, sizeof(*st));
    if (fd < 0)
        return;
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0)
        return;
    buf[n] = '\0';
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char key[32];
        unsigned long long value;
        if (sscanf(line, "%31s %llu", key, &value) != 2)
            continue;
        if (strcmp(key, "active") == 0)
            st->active = value;
        else if (strcmp(key, "awaiting") == 0)
            st->awaiting = (int)value;
        else if (strcmp(key, "down") == 0)
            st->down = (int)value;
    }
}

static void state_write(int fd, const fm_state_t *st) {
    char buf[256];
    if (fd < 0)
        return;
    int n = snprintf(buf, sizeof(buf), "active %llu\nawaiting %d\ndown %d\n", st->active,
                     st->awaiting, st->down);
    if (ftruncate(fd, 0) == 0 && pwrite(fd, buf, (size_t)n, 0) == n)
        fsync(fd);
}

static void state_unlock(int fd) {
    if (fd >= 0) {
        flock(fd, LOCK_UN);
        close(fd);
    }
}

static fmReturn_t check_handle(fmHandle_t h) {
    if (!g_inited)
        return FM_ST_UNINITIALIZED;
    if (h == NULL || ((fake_handle_t *)h)->magic != HANDLE_MAGIC)
        return FM_ST_BADPARAM;
    return FM_ST_SUCCESS;
}

/* ---- the API ---- */

API fmReturn_t fmLibInit(void) {
    if (g_inited)
        return FM_ST_IN_USE;
    g_inited = 1;
    return FM_ST_SUCCESS;
}

API fmReturn_t fmLibShutdown(void) {
    if (!g_inited)
        return FM_ST_UNINITIALIZED;
    g_inited = 0;
    return FM_ST_SUCCESS;
}

API fmReturn_t fmConnect(fmConnectParams_t *params, fmHandle_t *pFmHandle) {
    if (!g_inited)
        return FM_ST_UNINITIALIZED;
    if (params == NULL || pFmHandle == NULL)
        return FM_ST_BADPARAM;
    g_last_connect_version = params->version;
    if (params->version == fmConnectParams_version) {
        if (params->addressType != NV_FM_API_ADDR_TYPE_INET &&
            params->addressType != NV_FM_API_ADDR_TYPE_UNIX)
            return FM_ST_BADPARAM;
        g_last_address_type = (int)params->addressType;
    } else if (params->version == fmConnectParams_v1_version) {
        g_last_address_type = params->addressIsUnixSocket ? NV_FM_API_ADDR_TYPE_UNIX
                                                          : NV_FM_API_ADDR_TYPE_INET;
    } else {
        return FM_ST_VERSION_MISMATCH;
    }
    if (params->addressInfo[0] == '\0' || params->timeoutMs == 0)
        return FM_ST_BADPARAM;
    memcpy(g_last_address, params->addressInfo, FM_MAX_STR_LENGTH);
    g_last_address[FM_MAX_STR_LENGTH - 1] = '\0';

    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    state_unlock(fd);
    if (st.down)
        return FM_ST_CONNECTION_NOT_VALID;

    fake_handle_t *h = malloc(sizeof(*h));
    if (h == NULL)
        return FM_ST_GENERIC_ERROR;
    h->magic = HANDLE_MAGIC;
    *pFmHandle = h;
    return FM_ST_SUCCESS;
}

API fmReturn_t fmDisconnect(fmHandle_t h) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    ((fake_handle_t *)h)->magic = 0;
    free(h);
    return FM_ST_SUCCESS;
}

API fmReturn_t fmGetSupportedFabricPartitions(fmHandle_t h, fmFabricPartitionList_t *list) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    if (list == NULL)
        return FM_ST_BADPARAM;
    if (list->version != fmFabricPartitionList_version)
        return FM_ST_VERSION_MISMATCH;
    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    state_unlock(fd);
    if (st.down)
        return FM_ST_CONNECTION_NOT_VALID;
    if (st.awaiting)
        return FM_ST_NOT_CONFIGURED;

    list->numPartitions = NUM_PARTITIONS;
    list->maxNumPartitions = FM_MAX_FABRIC_PARTITIONS;
    for (unsigned int p = 0; p < NUM_PARTITIONS; p++) {
        fmFabricPartitionInfo_t *info = &list->partitionInfo[p];
        memset(info, 0, sizeof(*info));
        info->partitionId = p;
        info->isActive = (st.active >> p) & 1u;
        info->numGpus = TABLE[p].numGpus;
        unsigned int links = TABLE[p].numGpus > 1 ? LINKS : 0;
        for (unsigned int g = 0; g < TABLE[p].numGpus; g++) {
            fmFabricPartitionGpuInfo_t *gpu = &info->gpuInfo[g];
            gpu->physicalId = TABLE[p].modules[g];
            /* H100 generation: FM knows neither the UUID nor the PCI address. */
            gpu->uuid[0] = '\0';
            snprintf(gpu->pciBusId, sizeof(gpu->pciBusId), "00000000:00:00.0");
            gpu->numNvLinksAvailable = links;
            gpu->maxNumNvLinks = links;
            gpu->nvlinkLineRateMBps = links ? LINE_RATE_MBPS : 0;
        }
    }
    return FM_ST_SUCCESS;
}

API fmReturn_t fmActivateFabricPartition(fmHandle_t h, fmFabricPartitionId_t pid) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    if (st.down)
        ret = FM_ST_CONNECTION_NOT_VALID;
    else if (st.awaiting)
        ret = FM_ST_NOT_CONFIGURED;
    else if (pid >= NUM_PARTITIONS)
        ret = FM_ST_BADPARAM;
    else if ((st.active >> pid) & 1u)
        ret = FM_ST_IN_USE;
    else {
        for (unsigned int other = 0; other < NUM_PARTITIONS; other++)
            if (((st.active >> other) & 1u) && (module_mask(other) & module_mask(pid)))
                ret = FM_ST_IN_USE;
    }
    if (ret == FM_ST_SUCCESS) {
        st.active |= 1ull << pid;
        state_write(fd, &st);
    }
    state_unlock(fd);
    return ret;
}

API fmReturn_t fmDeactivateFabricPartition(fmHandle_t h, fmFabricPartitionId_t pid) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    if (st.down)
        ret = FM_ST_CONNECTION_NOT_VALID;
    else if (st.awaiting)
        ret = FM_ST_NOT_CONFIGURED;
    else if (pid >= NUM_PARTITIONS)
        ret = FM_ST_BADPARAM;
    else if (!((st.active >> pid) & 1u))
        ret = FM_ST_UNINITIALIZED;
    if (ret == FM_ST_SUCCESS) {
        st.active &= ~(1ull << pid);
        state_write(fd, &st);
    }
    state_unlock(fd);
    return ret;
}

API fmReturn_t fmSetActivatedFabricPartitions(fmHandle_t h,
                                              fmActivatedFabricPartitionList_t *list) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    if (list == NULL || list->numPartitions > FM_MAX_FABRIC_PARTITIONS)
        return FM_ST_BADPARAM;
    if (list->version != fmActivatedFabricPartitionList_version)
        return FM_ST_VERSION_MISMATCH;
    unsigned long long active = 0;
    for (unsigned int i = 0; i < list->numPartitions; i++) {
        if (list->partitionIds[i] >= NUM_PARTITIONS)
            return FM_ST_BADPARAM;
        active |= 1ull << list->partitionIds[i];
    }
    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    if (st.down) {
        ret = FM_ST_CONNECTION_NOT_VALID;
    } else {
        st.active = active;
        st.awaiting = 0;
        state_write(fd, &st);
    }
    state_unlock(fd);
    return ret;
}

API fmReturn_t fmGetUnsupportedFabricPartitions(fmHandle_t h,
                                                fmUnsupportedFabricPartitionList_t *list) {
    fmReturn_t ret = check_handle(h);
    if (ret != FM_ST_SUCCESS)
        return ret;
    if (list == NULL)
        return FM_ST_BADPARAM;
    if (list->version != fmUnsupportedFabricPartitionList_version)
        return FM_ST_VERSION_MISMATCH;
    fm_state_t st;
    int fd = state_lock();
    state_read(fd, &st);
    state_unlock(fd);
    if (st.down)
        return FM_ST_CONNECTION_NOT_VALID;
    list->numPartitions = 0; /* always empty on H100/H200-generation boards */
    return FM_ST_SUCCESS;
}

/* ---- for the tests only ---- */

API unsigned long fakeNvfmSizeof(int which) {
    switch (which) {
    case 0: return sizeof(fmConnectParams_v1);
    case 1: return sizeof(fmConnectParams_v2);
    case 2: return sizeof(fmFabricPartitionGpuInfo_t);
    case 3: return sizeof(fmFabricPartitionInfo_t);
    case 4: return sizeof(fmFabricPartitionList_t);
    case 5: return sizeof(fmActivatedFabricPartitionList_t);
    case 6: return sizeof(fmUnsupportedFabricPartitionList_t);
    default: return 0;
    }
}

API const char *fakeNvfmLastAddress(int *addressType, unsigned int *connectVersion) {
    *addressType = g_last_address_type;
    *connectVersion = g_last_connect_version;
    return g_last_address;
}
