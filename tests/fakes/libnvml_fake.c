/*
 * A fake libnvidia-ml.so.1: the part of NVML's published C API (nvml.h, as nvidia-ml-py's
 * pynvml.py mirrors it) that module discovery calls, answering for GPUs listed in a file.
 * Its default example is the H200 captured in shared/reference/hardware/h200-sxm-passthrough
 * (module 8 at 00000000:00:06.0). Built by tests/nvml_helpers.py with gcc:
 *
 *     gcc -shared -fPIC -O2 -Wall -Wextra -Werror -Wl,-soname,libnvidia-ml.so.1 \
 *         -o <dir>/libnvidia-ml.so.1 libnvml_fake.c
 *
 * The DT_SONAME makes it stand in for the real library both ways the product finds one:
 * LD_LIBRARY_PATH=<dir>, or preloaded by path (pynvml's dlopen("libnvidia-ml.so.1") then
 * matches the loaded object's SONAME).
 *
 * The GPUs come from the text file named by $NVSWITCH_DP_FAKE_NVML, read by nvmlInit. One
 * item a line ('#' starts a comment):
 *     <busId> <moduleId> <uuid> <serial>   a GPU, e.g.
 *         00000000:00:06.0 8 GPU-00000000-1111-2222-3333-444444444444 1650000000001
 *         a '-' for moduleId, uuid or serial makes that call NOT_SUPPORTED for the GPU
 *     init-error <code>                     nvmlInit* returns <code>
 *     pci-error <index> <code>              nvmlDeviceGetPciInfo_v3 of GPU <index> returns it
 * Variable unset or file missing: nvmlInit* returns DRIVER_NOT_LOADED, as NVML does on a
 * machine without the driver. A line it cannot parse: nvmlInit* returns UNKNOWN and the
 * line is printed on stderr. Every device call before nvmlInit (or after the matching
 * nvmlShutdown) returns UNINITIALIZED; string calls whose buffer is too short for the
 * value and its NUL return INSUFFICIENT_SIZE, as nvml.h documents.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum nvmlReturn_enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
} nvmlReturn_t;

#define NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32
#define NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE 16

/* nvml.h's nvmlPciInfo_t (pynvml.nvmlPciInfo_t), field for field. */
typedef struct nvmlPciInfo_st {
    char busIdLegacy[NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;    /* (device ID << 16) | vendor ID */
    unsigned int pciSubSystemId; /* (subsystem ID << 16) | subsystem vendor ID */
    char busId[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
} nvmlPciInfo_t;

#define MAX_GPUS 64
#define FIELD 96 /* NVML_DEVICE_UUID_V2_BUFFER_SIZE, the longest string here */

struct fake_gpu {
    char bus_id[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    unsigned int domain, bus, device, function;
    int has_module;
    unsigned int module_id;
    char uuid[FIELD]; /* "" means NOT_SUPPORTED */
    char serial[FIELD];
    nvmlReturn_t pci_error;
};

typedef struct fake_gpu *nvmlDevice_t;

static struct fake_gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static unsigned int init_count;

static nvmlReturn_t parse_gpu(const char *line) {
    char bus_id[64], module[32], uuid[FIELD], serial[FIELD];
    struct fake_gpu *gpu;
    if (gpu_count == MAX_GPUS ||
        sscanf(line, "%63s %31s %95s %95s", bus_id, module, uuid, serial) != 4 ||
        strlen(bus_id) >= NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE)
        return NVML_ERROR_UNKNOWN;
    gpu = &gpus[gpu_count];
    memset(gpu, 0, sizeof(*gpu));
    if (sscanf(bus_id, "%x:%x:%x.%x", &gpu->domain, &gpu->bus, &gpu->device, &gpu->function) != 4)
        return NVML_ERROR_UNKNOWN;
    strcpy(gpu->bus_id, bus_id);
    if (strcmp(module, "-") != 0) {
        char *end;
        gpu->module_id = (unsigned int)strtoul(module, &end, 10);
        if (*end != '\0')
            return NVML_ERROR_UNKNOWN;
        gpu->has_module = 1;
    }
    if (strcmp(uuid, "-") != 0)
        strcpy(gpu->uuid, uuid);
    if (strcmp(serial, "-") != 0)
        strcpy(gpu->serial, serial);
    gpu_count++;
    return NVML_SUCCESS;
}

/* Reads the device file; the return code is what nvmlInit answers. */
static nvmlReturn_t load(void) {
    const char *path = getenv("NVSWITCH_DP_FAKE_NVML");
    char line[512];
    nvmlReturn_t result = NVML_SUCCESS;
    FILE *file;
    gpu_count = 0;
    if (path == NULL || (file = fopen(path, "r")) == NULL)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    while (result == NVML_SUCCESS && fgets(line, sizeof(line), file) != NULL) {
        char word[32];
        int code;
        unsigned int index;
        line[strcspn(line, "#\n")] = '\0';
        if (sscanf(line, "%31s", word) != 1)
            continue; /* blank or comment */
        if (strcmp(word, "init-error") == 0) {
            if (sscanf(line, "%*s %d", &code) != 1)
                result = NVML_ERROR_UNKNOWN;
            else
                result = (nvmlReturn_t)code;
            continue;
        }
        if (strcmp(word, "pci-error") == 0) {
            if (sscanf(line, "%*s %u %d", &index, &code) != 2 || index >= gpu_count)
                result = NVML_ERROR_UNKNOWN; /* name a GPU listed above the line */
            else
                gpus[index].pci_error = (nvmlReturn_t)code;
            if (result == NVML_ERROR_UNKNOWN)
                fprintf(stderr, "libnvml_fake: cannot use line: %s\n", line);
            continue;
        }
        result = parse_gpu(line);
        if (result != NVML_SUCCESS)
            fprintf(stderr, "libnvml_fake: cannot use line: %s\n", line);
    }
    fclose(file);
    return result;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    nvmlReturn_t result;
    (void)flags;
    if (init_count > 0) { /* NVML counts nested inits; only the first reads the driver */
        init_count++;
        return NVML_SUCCESS;
    }
    result = load();
    if (result == NVML_SUCCESS)
        init_count = 1;
    return result;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

/* The handle's GPU, or NULL when the handle is not one this library gave out. */
static struct fake_gpu *gpu_of(nvmlDevice_t device) {
    unsigned int index;
    for (index = 0; index < gpu_count; index++)
        if (device == &gpus[index])
            return device;
    return NULL;
}

#define CHECK_DEVICE(device, gpu)                                                             \
    if (init_count == 0)                                                                      \
        return NVML_ERROR_UNINITIALIZED;                                                      \
    if ((gpu = gpu_of(device)) == NULL)                                                       \
        return NVML_ERROR_INVALID_ARGUMENT;

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (deviceCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= gpu_count || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    struct fake_gpu *gpu;
    CHECK_DEVICE(device, gpu)
    if (pci == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (gpu->pci_error != NVML_SUCCESS)
        return gpu->pci_error;
    memset(pci, 0, sizeof(*pci));
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.%X",
             gpu->domain & 0xffff, gpu->bus & 0xff, gpu->device & 0x1f, gpu->function & 0x7);
    pci->domain = gpu->domain;
    pci->bus = gpu->bus;
    pci->device = gpu->device;
    pci->pciDeviceId = 0x233510DE;    /* H200 SXM 141GB, as captured */
    pci->pciSubSystemId = 0x18BF10DE;
    strcpy(pci->busId, gpu->bus_id);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetModuleId(nvmlDevice_t device, unsigned int *moduleId) {
    struct fake_gpu *gpu;
    CHECK_DEVICE(device, gpu)
    if (moduleId == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu->has_module)
        return NVML_ERROR_NOT_SUPPORTED;
    *moduleId = gpu->module_id;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(const char *value, char *buffer, unsigned int length) {
    if (buffer == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (value[0] == '\0')
        return NVML_ERROR_NOT_SUPPORTED;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buffer, value);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct fake_gpu *gpu;
    CHECK_DEVICE(device, gpu)
    return copy_string(gpu->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length) {
    struct fake_gpu *gpu;
    CHECK_DEVICE(device, gpu)
    return copy_string(gpu->serial, serial, length);
}

/* The minor of /dev/nvidia<minor>: the driver numbers GPUs in probe order, which is the
 * order of the device file here. */
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber) {
    struct fake_gpu *gpu;
    CHECK_DEVICE(device, gpu)
    if (minorNumber == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *minorNumber = (unsigned int)(gpu - gpus);
    return NVML_SUCCESS;
}

/* Not NVML: lets the tests compare this layout with pynvml's ctypes one. */
unsigned int fakeNvmlPciInfoSize(void) { return (unsigned int)sizeof(nvmlPciInfo_t); }
